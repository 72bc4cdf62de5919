"""What a training run optimises. The worker loop (``loop.py``) is one piece of code for every run:
DeepSpeed, resume, data position, metrics, progress, checkpoints, the gathering of ZeRO-3 weights and
the upload of the export. An objective supplies the rest:

- :class:`LlavaObjective`: LLaVA's two stages (``pretrain``: the projector alone; ``finetune``:
  projector + LLM, or LoRA);
- :class:`VisionTowerObjective` and :class:`LanguageModelObjective`: the embedded default's stage 0,
  which makes the small pretrained parts LLaVA composes (a CLIP-style tower, a causal LM) on the
  synthetic world.

Objectives are built on the workers from the typed job config (:func:`make_objective`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch

from llava_platform.config.components import ComponentRunConfig
from llava_platform.config.schema import TrainConfig, TrainJobConfig
from llava_platform.train.worker import WorkerArgs


class Objective(ABC):
    """The model, the batches, the loss and the export of one kind of training run."""

    train: TrainConfig

    @abstractmethod
    def build(self) -> tuple[torch.nn.Module, dict[str, int]]:
        """The model to train, with ``requires_grad`` set, and its parameter counts
        (``trainable`` and ``total`` at least)."""

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (default: every trainable parameter at ``train.lr``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.train.lr}]

    @abstractmethod
    def collate(self, rows: Sequence[dict[str, Any]], device: Any) -> dict[str, torch.Tensor]:
        """Dataset rows -> one micro-batch on ``device``."""

    @abstractmethod
    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to back-propagate for a micro-batch (``module`` is the DeepSpeed engine)."""

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens in a micro-batch, for tokens/s."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else 0

    def probe(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Extra metrics measured on a micro-batch without training on it (default: none)."""
        return {}

    def flop_counter(self, model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], float] | None:
        """Model FLOPs of training on a collated micro-batch, for MFU (default: not known, no MFU)."""
        return None

    def fresh_model(self) -> torch.nn.Module:
        """A new full-size model on rank 0 to receive gathered ZeRO-3 weights (default: ``build``)."""
        return self.build()[0]

    def finalize(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to export from the trained one (LoRA merges here)."""
        return model

    @abstractmethod
    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        """Write the trained model to ``export_dir`` as plain HF directories."""


# ---------------------------------------------------------------------------------------------
# LLaVA's stages
# ---------------------------------------------------------------------------------------------


def apply_lora(model, lora_cfg):
    """LoRA adapters on the language model's linear layers; the projector keeps training fully and the
    vision tower stays frozen (LLaVA-1.5's LoRA recipe)."""
    from peft import LoraConfig, get_peft_model

    modules = "|".join(lora_cfg.target_modules)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=rf".*language_model.*\.({modules})",
        modules_to_save=["multi_modal_projector"],
        bias="none",
    )
    return get_peft_model(model, config)


class LlavaObjective(Objective):
    """LLaVA stage 1 (``pretrain``) or stage 2 (``finetune``) on prepared shards."""

    def __init__(self, args: WorkerArgs):
        self.job: TrainJobConfig = args.job  # type: ignore[assignment]
        self.train = self.job.train
        self.image_size = args.image_size
        self.args = args
        self.processor = None
        self._collate = None
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.train.precision]

    def _model(self):
        from llava_platform.model.builder import build_model

        model, processor = build_model(self.job.model, self.job.storage)
        if self.processor is None:
            self.processor = processor
        return model

    def build(self):
        from llava_platform.train.freezing import apply_stage

        t = self.train
        model = self._model()
        counts = apply_stage(model, t.stage, unfreeze_vision_tower=t.unfreeze_vision_tower)
        if t.lora is not None:
            model = apply_lora(model, t.lora)
            counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model, counts

    def flop_counter(self, model):
        from llava_platform.train.flops import LlavaFlops

        return LlavaFlops.of(model).batch

    def param_groups(self, model):
        t = self.train
        projector, rest = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (projector if "multi_modal_projector" in name else rest).append(p)
        # The LLM's group first: the logged `lr` is the first group's, and it is `train.lr`'s schedule.
        groups = [{"params": rest, "lr": t.lr}] if rest else []
        if projector:
            groups.append({"params": projector, "lr": t.projector_lr or t.lr})
        return groups

    def collate(self, rows, device):
        from llava_platform.data.sample import LlavaCollator

        if self._collate is None:
            ip = self.processor.image_processor
            self._collate = LlavaCollator(self.processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std,
                                          image_size=self.image_size)
        batch = {k: v.to(device) for k, v in self._collate(rows).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def loss(self, module, batch):
        loss = module(**batch).loss
        if "pixel_values" not in batch:
            loss = loss + self._zero_vision_term(module, batch["input_ids"].device)
        return loss

    def _zero_vision_term(self, module, device) -> torch.Tensor:
        """``0 x`` the projected features of a blank image. A text-only micro-batch (the modality
        grouping makes whole ones) leaves the projector and an unfrozen vision tower without gradients
        on that rank only; DeepSpeed then reduces different gradient sets on different ranks and gloo
        aborts. This term gives every vision-side parameter a zero gradient instead, as LLaVA does."""
        llava = next(m for m in module.modules() if hasattr(m, "get_image_features"))
        blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=self.dtype, device=device)
        feats = llava.get_image_features(pixel_values=blank).pooler_output
        return 0.0 * sum(f.sum() for f in feats)

    def probe(self, module, batch):
        """With ``train.blank_image_probe``: the micro-batch's loss with its images replaced by blank
        ones (the processor's mean colour, i.e. zeros after normalisation) beside its real loss. The gap
        is what the images contribute: stage 1's first proof that the projector carries visual
        information."""
        if not self.train.blank_image_probe or "pixel_values" not in batch:
            return {}
        with torch.no_grad():
            real = module(**batch).loss.item()
            blank = module(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).loss.item()
        return {"loss_real_images": real, "loss_blank_images": blank}

    def fresh_model(self):
        model = self._model()
        return apply_lora(model, self.train.lora) if self.train.lora is not None else model

    def finalize(self, model):
        return model.merge_and_unload() if self.train.lora is not None else model

    def export(self, model, export_dir):
        from llava_platform.model.builder import save_model
        from llava_platform.tracking.models import write_lineage

        from llava_platform.config.schema import STAGE_TEMPLATES
        from llava_platform.data.conversation import chat_template

        t = self.train
        template = self.args.template
        if template and template != STAGE_TEMPLATES["pretrain"]:  # serving and eval prompt as it trained
            self.processor.chat_template = chat_template(template)
        save_model(model, self.processor, export_dir)
        write_lineage(export_dir, {"stage": t.stage, "template": template, "run_name": self.job.name,
                                   "mlflow_run_id": self.args.mlflow_run_id,
                                   "parent_mlflow_run_id": self.args.parent_run_id, "steps": self.args.total_steps})
        if t.stage == "pretrain":
            from safetensors.torch import save_file

            proj = {k.split("multi_modal_projector.", 1)[1]: v.detach().contiguous()
                    for k, v in model.state_dict().items() if "multi_modal_projector." in k}
            os.makedirs(os.path.join(export_dir, "projector"))
            save_file(proj, os.path.join(export_dir, "projector", "projector.safetensors"))


# ---------------------------------------------------------------------------------------------
# Stage 0: the embedded default's pretrained parts
# ---------------------------------------------------------------------------------------------


class VisionTowerObjective(Objective):
    """A CLIP-style tower on the synthetic world: ``CLIPModel``'s contrastive loss on image-caption pairs
    plus a dense per-cell objective on the patch features LLaVA will take (see
    :class:`~llava_platform.model.components.VisionPretrainingModel`). Exported as a plain
    ``CLIPVisionModel`` directory with its image processor."""

    def __init__(self, run: ComponentRunConfig, tokenizer_dir: str):
        self.run = run
        self.train = run.train
        self.tokenizer_dir = tokenizer_dir
        self._terms: dict[str, float] = {}

    def build(self):
        from llava_platform.data.scenes import COLOURS, SHAPES
        from llava_platform.model.components import build_vision_pretraining_model

        torch.manual_seed(self.run.seed)
        # the dense objective's classes: an empty cell, then one per (kind, colour)
        tokenizer = self._tokenizer()
        model = build_vision_pretraining_model(self.run.vision_tower, len(tokenizer), tokenizer.eos_token_id,
                                               1 + len(SHAPES) * len(COLOURS))
        return model, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "total": sum(p.numel() for p in model.parameters())}

    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def collate(self, rows, device):
        from llava_platform.data.components import collate_vision_rows

        return {k: v.to(device) for k, v in collate_vision_rows(rows, self.run.vision_tower).items()}

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def loss(self, module, batch):
        out = module(**batch)
        terms = {k: getattr(out, k) for k in ("contrastive_loss", "cell_loss", "position_loss")}
        self._terms = {k: v.item() for k, v in terms.items() if v is not None}
        return out.loss

    def probe(self, module, batch):
        """The last micro-batch's loss terms (measured by ``loss``, no extra forward pass)."""
        return dict(self._terms)

    def export(self, model, export_dir):
        from llava_platform.model.components import save_vision_tower

        save_vision_tower(model, self.run.vision_tower, export_dir)


class LanguageModelObjective(Objective):
    """A small ``LlamaForCausalLM`` on the world's text (next-token loss), exported with its tokenizer."""

    def __init__(self, run: ComponentRunConfig, tokenizer_dir: str):
        self.run = run
        self.train = run.train
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def build(self):
        from llava_platform.model.components import build_language_model

        torch.manual_seed(self.run.seed)
        model = build_language_model(self.run.language_model, self.tokenizer)
        n = sum(p.numel() for p in model.parameters())
        return model, {"trainable": n, "total": n}

    def collate(self, rows, device):
        from llava_platform.data.components import collate_token_rows

        return {k: v.to(device) for k, v in collate_token_rows(rows, self.tokenizer.pad_token_id).items()}

    def loss(self, module, batch):
        return module(**batch).loss

    def export(self, model, export_dir):
        model.save_pretrained(export_dir)
        self.tokenizer.save_pretrained(export_dir)


def make_objective(args: WorkerArgs) -> Objective:
    """The objective a worker's arguments ask for (``WorkerArgs`` checks that job and kind fit)."""
    if args.objective == "llava":
        return LlavaObjective(args)
    components = {"vision_tower": VisionTowerObjective, "language_model": LanguageModelObjective}
    return components[args.objective](args.job, args.tokenizer_dir)

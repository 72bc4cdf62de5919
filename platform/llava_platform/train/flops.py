"""Model FLOPs of a LLaVA training step, and the accelerator's peak, for MFU.

Counted as PaLM's appendix B counts them (and as nanoGPT's ``estimate_mfu``): a weight matrix costs
2 FLOPs per parameter per token forward, 2 more for the gradient of its input and 2 for the gradient
of its weight when it trains; attention costs ``4 * layers * width * t`` FLOPs per token forward for a
sequence of ``t`` tokens, twice that backward. Per part of LLaVA:

- the vision tower runs forward on every patch (and the CLS token); it runs backward only when it
  trains (``unfreeze_vision_tower``);
- the projector runs on every image token that reaches the language model;
- the language model runs on every token of a sequence (the image tokens included) and always runs
  backward for its inputs' gradients, since the projector beneath it trains in both stages.

Input embeddings are lookups (no FLOPs); the LM head is a matmul over every position. These are
*model* FLOPs: recomputation under gradient checkpointing is not counted, as MFU's definition asks.
Components in the model that are not listed above (a norm, a bias) are left out: they are a rounding
error beside the matmuls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

# Dense (no sparsity) tensor-core peak per device in TFLOP/s for bf16/fp16, from NVIDIA's data sheets.
# Anything else, or fp32: set `train.peak_tflops`.
# A key matches whole words of torch's device name ("NVIDIA A100-SXM4-80GB" is an A100; an L40 is not
# an L4); the longest matching key wins ("H100 PCIe" before "H100", which is the SXM part).
PEAK_TFLOPS_16BIT = {
    "H200": 989.0,
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


@dataclass(frozen=True)
class Part:
    """One transformer stack: its matmul parameters (all, and those that train), layers, width."""

    params: int
    trainable: int
    layers: int = 0
    width: int = 0

    def forward(self, tokens: int) -> float:
        """Forward FLOPs of one sequence of ``tokens`` tokens."""
        return 2.0 * self.params * tokens + 4.0 * self.layers * self.width * tokens * tokens

    def train(self, tokens: int, backward: bool) -> float:
        """Forward, and with ``backward`` the inputs' gradients (matmuls once more, attention twice
        more) and the trainable weights' gradients."""
        matmuls, attention = 2.0 * self.params * tokens, 4.0 * self.layers * self.width * tokens * tokens
        if not backward:
            return matmuls + attention
        return 2 * matmuls + 3 * attention + 2.0 * self.trainable * tokens


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions leave numel() at 0


def _count(module, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    total = trainable = 0
    # PEFT's modules_to_save keeps an untouched copy in `original_module` that the forward never runs.
    skip = (*skip, "original_module.")
    for name, p in module.named_parameters():
        if p.dim() < 2 or any(s in name for s in skip):  # biases and norms; embeddings are lookups
            continue
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


@dataclass(frozen=True)
class LlavaFlops:
    vision: Part
    projector: Part
    language: Part
    patches: int  # vision tokens per image, CLS included
    image_tokens: int  # of them, those the language model sees

    @classmethod
    def of(cls, model) -> "LlavaFlops":
        """From a LLaVA model (HF ``LlavaForConditionalGeneration``, PEFT-wrapped or not) as it will
        train: ``requires_grad`` says which parts do."""
        parts = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules()
                 if name.rsplit(".", 1)[-1] in ("vision_tower", "multi_modal_projector", "language_model", "lm_head")}
        cfg = model.config
        v, t = cfg.vision_config, cfg.text_config
        patches = (v.image_size // v.patch_size) ** 2 + 1
        # Position and patch embeddings: the patch conv is a matmul per patch, the positions a lookup.
        vision = Part(*_count(parts["vision_tower"], skip=("position_embedding",)), v.num_hidden_layers, v.hidden_size)
        lm_params = [sum(x) for x in zip(_count(parts["language_model"], skip=("embed_tokens",)), _count(parts["lm_head"]))]
        language = Part(*lm_params, t.num_hidden_layers, t.hidden_size)
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        return cls(vision, Part(*_count(parts["multi_modal_projector"])), language, patches,
                   patches - 1 if strategy == "default" else patches)

    def step(self, sequence_lengths: Sequence[int], images: int) -> float:
        """Training FLOPs of a micro-batch: its sequences' real (unpadded) lengths, image tokens
        included, and the number of images in it."""
        vision_backward = self.vision.trainable > 0
        flops = images * self.vision.train(self.patches, backward=vision_backward)
        flops += images * self.projector.train(self.image_tokens, backward=True)
        if not vision_backward:  # nothing below the projector needs its inputs' gradients
            flops -= images * 2.0 * self.projector.params * self.image_tokens
        return flops + sum(self.language.train(int(n), backward=True) for n in sequence_lengths)

    def batch(self, batch: dict[str, Any]) -> float:
        """:meth:`step` of a collated batch (``attention_mask``, ``pixel_values``)."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        images = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0
        return self.step(lengths, images)


def peak_flops(precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """Peak FLOP/s of one device of this worker and where the figure comes from; None when it is not
    known (CPU, fp32 or a GPU missing from the table, without ``override_tflops``)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "train.peak_tflops"
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU (set train.peak_tflops to report MFU)"
    name = torch.cuda.get_device_name()
    if precision not in ("bf16", "fp16"):
        return None, f"{precision} on {name}: set train.peak_tflops to report MFU"
    for key in sorted(PEAK_TFLOPS_16BIT, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name):
            return PEAK_TFLOPS_16BIT[key] * 1e12, f"{name} ({precision}, dense)"
    return None, f"{name} is not in the peak table: set train.peak_tflops to report MFU"

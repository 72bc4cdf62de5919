"""The per-worker training function that Ray Train runs: one LLaVA stage under DeepSpeed.

Phases, each a small function: set up the model (build, freeze per stage or LoRA), the optimizer and
schedule, DeepSpeed, the data; resume from ``ray.train.get_checkpoint()``; train with a rank-0 progress
line and MLflow metrics; checkpoint every ``save_steps`` (every rank saves its DeepSpeed shard and every
rank reports); export in HF format at the end.

Data position: the dataset shard is read in a fixed order (``preserve_order``), so the micro-batches of
an epoch are the same on every attempt; a checkpoint records the epoch and the micro-batches already
consumed in it, and a resumed attempt skips exactly those.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from llava_platform.config.schema import TrainJobConfig

STATE_FILE = "train_state.json"
TAG = "state"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already trained
    samples: int = 0


def rank0_print(msg: str) -> None:
    """One progress line from rank 0. Written to the process's real stdout: Ray Train's print patch
    would otherwise emit it twice when another library has wrapped ``sys.stdout``."""
    import sys

    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        print(msg, file=sys.__stdout__, flush=True)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def _setup_model(job: TrainJobConfig):
    from llava_platform.model.builder import apply_stage, build_model

    model, processor = build_model(job.model, job.storage)
    t = job.train
    counts = apply_stage(model, t.stage, unfreeze_vision_tower=t.unfreeze_vision_tower)
    if t.lora is not None:
        model = apply_lora(model, t.lora)
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, processor, counts


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


def _setup_optimizer(model, job: TrainJobConfig):
    import torch

    t = job.train
    projector, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projector if "multi_modal_projector" in name else rest).append(p)
    groups = [{"params": projector, "lr": t.projector_lr or t.lr}] if projector else []
    if rest:
        groups.append({"params": rest, "lr": t.lr})
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))


def _setup_scheduler(optimizer, job: TrainJobConfig, total_steps: int):
    from transformers import get_scheduler

    t = job.train
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _micro_batches(shard, job: TrainJobConfig, epoch: int) -> Iterator[list[dict[str, Any]]]:
    from llava_platform.data.batching import length_grouped_batches

    t = job.train
    rows = (row for b in shard.iter_batches(batch_size=256, batch_format="pandas") for row in b.to_dict("records"))
    if t.group_by_modality_length:
        yield from length_grouped_batches(rows, t.micro_batch_size, seed=t.seed + epoch, drop_last=True)
        return
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == t.micro_batch_size:
            yield batch
            batch = []


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _zero_vision_term(module: torch.nn.Module, image_size: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``0 x`` the projected features of a blank image. A text-only micro-batch (the modality
    grouping makes whole ones) leaves the projector and an unfrozen vision tower without gradients on
    that rank only; DeepSpeed then reduces different gradient sets on different ranks and gloo
    aborts. This term gives every vision-side parameter a zero gradient instead, as LLaVA does."""
    import torch

    llava = next(m for m in module.modules() if hasattr(m, "get_image_features"))
    blank = torch.zeros(1, 3, image_size, image_size, dtype=dtype, device=device)
    feats = llava.get_image_features(pixel_values=blank).pooler_output
    return 0.0 * sum(f.sum() for f in feats)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config`` carries the validated job config and run facts."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from llava_platform.data.sample import LlavaCollator
    from llava_platform.train.deepspeed_config import build_deepspeed_config
    from llava_platform.train.tracking import RunLogger

    job = TrainJobConfig.model_validate(config["job"])
    t = job.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    total_steps: int = config["total_steps"]
    torch.manual_seed(t.seed)
    if config.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]

    model, processor, counts = _setup_model(job)
    optimizer = _setup_optimizer(model, job)
    scheduler = _setup_scheduler(optimizer, job, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(t, config.get("deepspeed_overrides")))
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = TrainState(**json.load(f))
        rank0_print(f"[train] resumed at step {state.step}/{total_steps} (epoch {state.epoch},"
                    f" {state.micro_in_epoch} micro-batches into it)")
    else:
        rank0_print(f"[train] stage {t.stage}: {counts['trainable']:,} of {counts['total']:,} parameters train;"
                    f" {total_steps} optimizer steps")

    ip = processor.image_processor
    collate = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std,
                            image_size=config["image_size"])
    shard = ray.train.get_dataset_shard("train")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t.precision]
    trace_dir = config.get("trace_dir")  # tests record the ids each step trained on

    t_step, step_loss, step_tokens, step_ids, started = time.time(), 0.0, 0, [], time.time()
    start_step = state.step
    while state.step < total_steps:
        micro = 0
        for rows in _micro_batches(shard, job, state.epoch):
            if micro < state.micro_in_epoch:
                micro += 1
                continue
            batch = {k: v.to(engine.device) for k, v in collate(rows).items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            loss = engine(**batch).loss
            if "pixel_values" not in batch:
                loss = loss + _zero_vision_term(engine.module, config["image_size"], dtype, engine.device)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            micro += 1
            state.micro_in_epoch = micro
            step_loss += loss.item() / engine.gradient_accumulation_steps()
            step_tokens += int(batch["attention_mask"].sum())
            step_ids += [r["id"] for r in rows]
            if not boundary:
                continue
            state.step += 1
            stats = torch.tensor([step_loss, float(step_tokens)])
            dist.all_reduce(stats)
            elapsed = time.time() - t_step
            metrics = {
                "loss": stats[0].item() / dist.get_world_size(),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": t.global_batch_size / elapsed,
                "tokens_per_s": stats[1].item() / elapsed,
                "step_time_s": elapsed,
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            state.samples += t.global_batch_size
            if trace_dir:
                with open(os.path.join(trace_dir, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": state.step, "ids": step_ids}) + "\n")
            if logger is not None and (state.step % t.logging_steps == 0 or state.step == total_steps):
                logger.metrics(metrics, state.step)
                eta = (time.time() - started) / (state.step - start_step) * (total_steps - state.step)
                rank0_print(f"[train] step {state.step}/{total_steps} | loss {metrics['loss']:.4f}"
                            f" | lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.1f} samples/s"
                            f" | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            if state.step % t.save_steps == 0 or state.step == total_steps:
                _save_checkpoint(engine, state, metrics, rank, logger)
            t_step, step_loss, step_tokens, step_ids = time.time(), 0.0, 0, []
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1
            state.micro_in_epoch = 0
            continue
        break

    _export(engine, processor, job, config, rank, logger)


def _save_checkpoint(engine, state: TrainState, metrics: dict[str, float], rank: int, logger) -> None:
    """Every rank saves its DeepSpeed shard into its own folder and every rank reports it; Ray Train
    gathers the folders into one checkpoint."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=TAG)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            if logger is not None:
                logger.tag("last_checkpoint_step", str(state.step))
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(engine, processor, job: TrainJobConfig, config: dict[str, Any], rank: int, logger) -> None:
    """HF-format export of the trained model (ZeRO-3 weights gathered; LoRA merged), plus the projector
    alone after stage 1; logged to MLflow and registered as a new model version."""
    import torch

    from llava_platform import storage
    from llava_platform.model.builder import build_model, save_model

    t = job.train
    rebuild = t.lora is not None or t.zero_stage == 3
    # Gathering ZeRO-3 weights is collective: every rank takes part, rank 0 receives them.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if t.zero_stage == 3 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "export")
        if rebuild:
            if state_dict is None:
                state_dict = engine.module.state_dict()
            # A fresh full-size copy on rank 0 receives the gathered weights (and merges LoRA).
            model, _ = build_model(job.model, job.storage)
            if t.lora is not None:
                model = apply_lora(model, t.lora)
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
            if unexpected or [m for m in missing if "lora" in m]:
                raise RuntimeError(f"export: state dict does not fit the model: {unexpected[:3]} {missing[:3]}")
            if t.lora is not None:
                model = model.merge_and_unload()
        else:
            model = engine.module
        model = model.to(torch.float32) if t.precision != "fp32" else model
        save_model(model, processor, export_dir)
        info = {"stage": t.stage, "run_name": job.name, "mlflow_run_id": config["mlflow_run_id"],
                "parent_mlflow_run_id": config.get("parent_run_id"), "steps": config["total_steps"]}
        with open(os.path.join(export_dir, "training_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        if t.stage == "pretrain":
            from safetensors.torch import save_file

            proj = {k.split("multi_modal_projector.", 1)[1]: v.detach().contiguous()
                    for k, v in model.state_dict().items() if "multi_modal_projector." in k}
            os.makedirs(os.path.join(export_dir, "projector"))
            save_file(proj, os.path.join(export_dir, "projector", "projector.safetensors"))
        storage.upload_dir(export_dir, job.output_path, job.storage)
        if logger is not None:
            source = logger.artifacts(export_dir, "export")
            if job.tracking.registered_model_name:
                parent = config.get("parent_run_id")
                desc = f"LLaVA stage {t.stage} ({job.name}), MLflow run {config['mlflow_run_id']}"
                desc += f"; from stage-1 run {parent}" if parent else ""
                version = logger.register(job.tracking.registered_model_name, source, desc)
                logger.tag("registered_model_version", f"{job.tracking.registered_model_name}/{version}")
            logger.finish()

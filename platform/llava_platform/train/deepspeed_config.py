"""The one function that turns a typed TrainConfig into a DeepSpeed config dict."""

from __future__ import annotations

import copy
from typing import Any

from llava_platform.config.schema import TrainConfig


def build_deepspeed_config(train: TrainConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed config for one stage: batch sizes, ZeRO stage and offload, precision, clipping.

    global batch = micro batch x gradient accumulation x workers (``TrainConfig`` checks it divides).
    The optimizer and scheduler are torch/transformers objects passed to ``deepspeed.initialize``,
    so DeepSpeed's compiled optimizers are not needed (``zero_force_ds_cpu_optimizer: false`` lets
    ZeRO-Offload run with a torch optimizer).

    Args:
        train: the stage's typed config.
        overrides: nested keys merged over the result, for settings the typed config does not model.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if train.zero_stage == 3:
        # Gather full weights when exporting; keep small params resident.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=10_000)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Progress is printed by the platform's own rank-0 line.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, overrides or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

"""Which parts of a LLaVA train in which stage (LLaVA's recipe): stage 1 the projector alone, stage 2
the projector and the language model, the vision tower frozen unless asked."""

from __future__ import annotations

import torch

from llava_platform.model.assembly import COMPONENTS, component_of


def apply_stage(model: torch.nn.Module, stage: str, unfreeze_vision_tower: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` for a LLaVA stage and report parameter counts.

    ``pretrain`` (stage 1, feature alignment) trains only the projector. ``finetune`` (stage 2, visual
    instruction tuning) trains projector + language model; the vision tower stays frozen unless
    ``unfreeze_vision_tower``.

    Returns:
        ``{"<component>_trainable": n, ..., "trainable": n, "total": n}``.

    Raises:
        ValueError: unknown stage.
    """
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}; choose pretrain or finetune")
    train = {"projector"}
    if stage == "finetune":
        train.add("language_model")
        if unfreeze_vision_tower:
            train.add("vision_tower")
    counts = {f"{c}_trainable": 0 for c in COMPONENTS}
    total = 0
    for name, param in model.named_parameters():
        comp = component_of(name)
        param.requires_grad_(comp in train)
        total += param.numel()
        if param.requires_grad:
            counts[f"{comp}_trainable"] += param.numel()
    counts["trainable"] = sum(counts.values())
    counts["total"] = total
    return counts

"""A plain-PyTorch optimizer step over a LLaVA batch.

The distributed loop (Ray Train + DeepSpeed) lives beside this; this step is what the foundation's
smoke path and the single-process benchmark baseline use.
"""

from __future__ import annotations

import math

import torch


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None = 1.0) -> float:
    """Forward, backward, clip, step, zero grads. Returns the loss.

    Raises:
        FloatingPointError: the loss is not finite (nothing is stepped).
    """
    model.train()
    loss = model(**batch).loss
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

"""DeepSpeed behind one object, in the manner of OpenRLHF's ``DeepspeedStrategy``: the worker loop
prepares, steps, saves, loads and gathers through it and reads as training, not DeepSpeed plumbing.

One strategy per worker. Everything that is collective (``step`` at an accumulation boundary,
``all_reduce_sum``, ``gather_full_state_dict`` under ZeRO-3, ``save``) must be called by every rank.
"""

from __future__ import annotations

from typing import Any

from llava_platform.config.schema import TrainConfig

#: The DeepSpeed checkpoint tag inside a Ray Train checkpoint directory.
TAG = "state"


class DeepSpeedStrategy:
    def __init__(self, train: TrainConfig, overrides: dict[str, Any] | None = None):
        self.train = train
        self.overrides = overrides
        self.engine: Any = None

    # --- setup -----------------------------------------------------------------------------------

    def prepare(self, model: Any, optimizer: Any, scheduler: Any) -> Any:
        """Wrap the model, optimizer and schedule in a DeepSpeed engine (the config built from
        ``train``, with ``overrides`` merged over it); returns the engine, which is also the module to
        call forward on."""
        import deepspeed

        from llava_platform.train.deepspeed_config import build_deepspeed_config

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=build_deepspeed_config(self.train, self.overrides))
        return self.engine

    @property
    def module(self) -> Any:
        """The wrapped model itself (under ZeRO-3 its parameters are partitioned across ranks)."""
        return self.engine.module

    @property
    def device(self) -> Any:
        return self.engine.device

    @property
    def accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_initialized() else 1

    # --- training --------------------------------------------------------------------------------

    def backward_and_step(self, loss: Any) -> bool:
        """Back-propagate a micro-batch's loss and step; True when this micro-batch completed an
        optimizer step (the accumulation boundary), when the optimizer and schedule moved."""
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm (None where DeepSpeed does not keep it)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (collective)."""
        import torch
        import torch.distributed as dist

        stats = torch.tensor(values, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(stats)
        return stats.tolist()

    # --- state -----------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """This rank's shard of the model, optimizer and schedule into ``directory`` (collective)."""
        self.engine.save_checkpoint(directory, tag=TAG)

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag=TAG)

    def gather_full_state_dict(self) -> dict[str, Any] | None:
        """Under ZeRO-3, the full weights gathered onto rank 0 (collective: every rank must call it;
        the others get None); below ZeRO-3 every rank holds them already and this returns None.

        DeepSpeed gathers them with the engine's consolidation method, as Accelerate's
        ``get_state_dict`` does: parameter by parameter onto rank 0, never the whole model on every
        rank.
        """
        if self.train.zero_stage != 3:
            return None
        state = self.engine._zero3_consolidated_16bit_state_dict()
        return state if self.is_rank0 else None

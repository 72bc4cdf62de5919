"""A training loop's figures between two logging steps: each rank adds up its own, and one collective
averages them over the ranks when they are logged (or a checkpoint is written)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Window:
    """One rank's figures since the last logging step, and their average over the ranks."""

    start: float
    steps: int = 0
    loss: float = 0.0
    tokens: int = 0
    wait: float = 0.0
    flops: float = 0.0
    elapsed: float = 0.0
    reduced_tokens: int = 0
    reduced_wait: float = 0.0

    def reduce(self, strategy, probes: dict[str, float], global_batch: int, lr: float, peak) -> dict[str, float]:
        """The window's metrics averaged over the ranks (collective): loss, step time and data wait per
        step, throughput over the window, the probes."""
        names = sorted(probes)
        stats = strategy.all_reduce_sum([self.loss, float(self.tokens), self.wait, self.flops,
                                         *(probes[k] for k in names)])
        world, steps = strategy.world_size, max(1, self.steps)
        self.elapsed = time.time() - self.start
        self.reduced_tokens, self.reduced_wait = int(stats[1]), stats[2] / world
        metrics = {
            "loss": stats[0] / world / steps,
            "lr": lr,
            "samples_per_s": global_batch * steps / self.elapsed,
            "tokens_per_s": stats[1] / self.elapsed,
            "step_time_s": self.elapsed / steps,
            "data_wait_s": self.reduced_wait / steps,
            **{k: stats[4 + i] / world for i, k in enumerate(names)},
        }
        if peak is not None:
            metrics["mfu"] = stats[3] / (self.elapsed * world * peak)
        return metrics

import time

from llava_platform.train.window import Window


class TwoEqualRanks:
    """A strategy stand-in: two ranks that measured the same figures."""

    world_size = 2

    def __init__(self):
        self.calls = 0

    def all_reduce_sum(self, values):
        self.calls += 1
        return [2 * v for v in values]


def test_a_window_of_steps_is_averaged_per_step_and_over_ranks_in_one_collective():
    w = Window(start=time.time() - 1.5)  # the window took ~1.5 s
    for loss in (1.0, 2.0, 3.0):  # three optimizer steps of 10 tokens, 0.1 s waiting for input each
        w.steps += 1
        w.loss += loss
        w.tokens += 10
        w.wait += 0.1
    strategy = TwoEqualRanks()
    metrics = w.reduce(strategy, {"probe": 0.25}, global_batch=16, lr=1e-3, peak=None)
    assert strategy.calls == 1
    assert metrics["loss"] == 2.0  # the mean step loss, not the last one
    assert abs(metrics["data_wait_s"] - 0.1) < 1e-9 and metrics["probe"] == 0.25 and metrics["lr"] == 1e-3
    assert abs(metrics["step_time_s"] - 0.5) < 0.05 and abs(metrics["samples_per_s"] - 32) < 3
    assert w.reduced_tokens == 60 and abs(w.reduced_wait - 0.3) < 1e-9  # both ranks' tokens, the mean rank's wait
    assert "mfu" not in metrics
    assert "mfu" in w.reduce(strategy, {}, global_batch=16, lr=1e-3, peak=1e9)

"""The DeepSpeed strategy in one process (gloo, CPU), run in a subprocess so its process group does not
outlive the test: steps land on accumulation boundaries, a saved state loads back exactly, and under
ZeRO-3 the gathered weights are the whole model while below it there is nothing to gather."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    from llava_platform.config.schema import TrainConfig
    from llava_platform.train.strategy import DeepSpeedStrategy

    zero = int(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    train = TrainConfig(stage="finetune", global_batch_size=4, micro_batch_size=2, lr=1e-2, precision="fp32",
                        zero_stage=zero)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    strategy = DeepSpeedStrategy(train)
    engine = strategy.prepare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    boundaries = []
    for i in range(4):
        x = torch.randn(2, 8)
        loss = engine(x).pow(2).mean()
        boundaries.append(strategy.backward_and_step(loss))
    with tempfile.TemporaryDirectory() as d:
        strategy.save(d)
        before = {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}
        for i in range(2):
            strategy.backward_and_step(engine(torch.randn(2, 8)).pow(2).mean())
        strategy.load(d)
        after = strategy.module.state_dict()
        restored = all(torch.equal(before[k], after[k]) for k in before)
    gathered = strategy.gather_full_state_dict()
    print(json.dumps({"boundaries": boundaries, "accumulation": strategy.accumulation_steps, "restored": restored,
                      "rank0": strategy.is_rank0, "world": strategy.world_size, "sum": strategy.all_reduce_sum([1.5, 2.0]),
                      "gathered": None if gathered is None else {k: list(v.shape) for k, v in gathered.items()},
                      "shapes": shapes, "grad_norm": strategy.grad_norm()}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero", [2, 3])
def test_strategy_steps_saves_loads_and_gathers(zero, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(zero)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["boundaries"] == [False, True, False, True] and got["accumulation"] == 2
    assert got["restored"] and got["rank0"] and got["world"] == 1 and got["sum"] == [1.5, 2.0]
    assert got["gathered"] == (got["shapes"] if zero == 3 else None)

"""Benchmark: samples/s of the Ray Train + DeepSpeed training loop (one worker) against a plain
single-process PyTorch loop over the same model, data and batch size, in one run.

    python bench/train.py                  # small preset, stage 2, 40 steps of batch 8
    python bench/train.py --zero 0 --steps 60

Start-up is excluded on both sides: each side times its own optimizer steps, and the first
``--warmup`` steps are dropped; the figure is the median step's samples/s. The plain loop uses the same
collate, AdamW, gradient clipping and data order (the prepared shards read in order).

It also prints how much of the machine's CPU each side's training process had while it trained, and
how much went to everything else: on a small machine Ray's own processes (GCS, raylet, dashboard, the
Train controller and Data coordinator actors) take a share the plain loop never pays.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _cpu_sample(proc) -> tuple[float, float, float]:
    """(wall time, the machine's busy CPU seconds, ``proc``'s CPU seconds; NaN if it is gone)."""
    import psutil

    c = psutil.cpu_times()
    try:
        own = proc.cpu_times()
        seconds = own.user + own.system
    except psutil.Error:
        seconds = float("nan")
    return time.time(), c.user + c.nice + c.system + c.irq + c.softirq + c.steal, seconds


def _cpu_shares(first: tuple[float, float, float], last: tuple[float, float, float]) -> tuple[float, float]:
    """Between two :func:`_cpu_sample` s: (the process's share of the machine's CPU, everything else's)."""
    (t0, busy0, own0), (t1, busy1, own1) = first, last
    capacity = (t1 - t0) * (os.cpu_count() or 1)
    return (own1 - own0) / capacity, ((busy1 - busy0) - (own1 - own0)) / capacity


class CpuSampler:
    """Samples (:func:`_cpu_sample`) the Ray Train worker process (found by the title Ray gives it) once
    a second on a thread, so the report can say how much of the machine the worker had while it trained
    and how much went to everything else (Ray's own processes, the driver)."""

    def __init__(self, interval_s: float = 1.0):
        import threading

        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        worker = None
        while not self._stop.wait(self._interval):
            if worker is None:  # the worker starts after the sampler
                worker = next((p for p in psutil.process_iter(["cmdline"])
                               if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])), None)
            if worker is not None:
                self.samples.append(_cpu_sample(worker))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self, start: float, end: float) -> tuple[float, float] | None:
        """:func:`_cpu_shares` between two wall times (None: fewer than two samples there)."""
        inside = [s for s in self.samples if start <= s[0] <= end and not math.isnan(s[2])]
        return _cpu_shares(inside[0], inside[-1]) if len(inside) >= 2 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the figure (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (micro = global, one worker)")
    parser.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage for the Ray side (default 2)")
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--logging-steps", type=int, default=1,
                        help="the Ray side's train.logging_steps (default 1); with N > 1 its metrics are reduced over "
                             "the ranks every N steps only, and each figure is the mean step of N")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Both sides compute with every core: Ray would otherwise set OMP_NUM_THREADS from the worker's
    # (fractional) CPU reservation, and the comparison would measure thread counts, not overhead.
    threads = os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)

    import psutil
    import pyarrow.dataset as pads
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from llava_platform.config import PreprocessJobConfig, TrainJobConfig, load_config
    from llava_platform.preprocess import prepare
    from llava_platform.data.sample import LlavaCollator
    from llava_platform.data.synthetic import write_dataset
    from llava_platform.train.freezing import apply_stage
    from llava_platform.model.presets import build_preset
    from llava_platform.ray_utils import init_ray
    from llava_platform.train.step import optimizer_step, trainable_parameters
    from llava_platform.train.trainer import run_training

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        write_dataset(root / "synth", n=max(400, args.steps * args.batch), seed=0, n_eval=1)
        init_ray(num_cpus=os.cpu_count(), _temp_dir=temp)
        prepare(load_config(None, PreprocessJobConfig, [
            "stage=finetune", f"model.preset={args.preset}", f"data.data_path={root / 'synth' / 'instruct.json'}",
            f"data.image_root={root / 'synth' / 'images'}", f"output_path={root / 'prep'}", "num_workers=1",
            "cpus_per_worker=0.5", "data.max_length=512"]))

        # Ray Train + DeepSpeed, one worker.
        job = load_config(None, TrainJobConfig, [
            "name=bench", f"model.preset={args.preset}", f"prepared_data={root / 'prep'}",
            f"storage_path={root / 'runs'}", f"output_path={root / 'export'}", "train.stage=finetune",
            "train.num_workers=1", f"train.cpus_per_worker={max(0.5, threads - 1)}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}", "train.lr=1e-4", f"train.max_steps={args.steps}",
            f"train.save_steps={10 * args.steps}", "train.precision=fp32", f"train.zero_stage={args.zero}",
            "train.lr_scheduler=constant", "train.max_grad_norm=1.0", f"train.logging_steps={args.logging_steps}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
        sampler = CpuSampler()
        try:
            result = run_training(job)
        finally:
            sampler.stop()
        client = MlflowClient(result.tracking_uri)

        def logged(key: str) -> list:  # the logged windows that start after the warm-up
            return [m for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)
                    if m.step - args.logging_steps >= args.warmup]

        steps_logged = logged("step_time_s")
        ray_times, ray_waits = [m.value for m in steps_logged], [m.value for m in logged("data_wait_s")]
        # the CPU shares over the logged windows (from the end of the first to the end of the last)
        shares = (sampler.shares(steps_logged[0].timestamp / 1000, steps_logged[-1].timestamp / 1000)
                  if steps_logged else None)
        ray.shutdown()

        # The plain single-process loop over the same rows in the same order.
        torch.set_num_threads(threads)
        model, processor = build_preset(args.preset, seed=0)
        apply_stage(model, "finetune")
        rows = pads.dataset(str(root / "prep" / "shards" / "status=ok"), format="parquet").to_table().to_pylist()
        ip = processor.image_processor
        collate = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std,
                                image_size=model.config.vision_config.image_size)
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, weight_decay=0.0)
        plain_times = []
        me = psutil.Process()
        plain_cpu = _cpu_sample(me)
        for step in range(args.steps):
            batch_rows = rows[(step * args.batch) % len(rows):][: args.batch]
            t0 = time.perf_counter()
            optimizer_step(model, collate(batch_rows), opt, max_grad_norm=1.0)
            plain_times.append(time.perf_counter() - t0)
        plain_shares = _cpu_shares(plain_cpu, _cpu_sample(me))
        plain_times = plain_times[args.warmup:]

        ray_sps = args.batch / statistics.median(ray_times)
        plain_sps = args.batch / statistics.median(plain_times)
        print(f"\n{args.preset} preset, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up left out),"
              f" {os.cpu_count()} CPU cores, ZeRO-{args.zero}, fp32")
        print(f"{'':<34}{'samples/s':>10}")
        print(f"{'plain PyTorch, one process':<34}{plain_sps:>10.1f}")
        print(f"{'Ray Train + DeepSpeed, 1 worker':<34}{ray_sps:>10.1f}")
        print(f"{'ratio (Ray / plain)':<34}{ray_sps / plain_sps:>10.2f}")
        # Where the Ray side's extra time goes: its median step, the part of it spent getting input
        # (rows from the shard + collate; the plain loop's collate is inside its step too).
        print(f"median step: plain {statistics.median(plain_times) * 1000:.0f} ms, Ray {statistics.median(ray_times) * 1000:.0f} ms"
              f" (of it waiting for input {statistics.median(ray_waits) * 1000:.0f} ms)")
        # Where the machine's CPU went while each side trained.
        print(f"CPU of the machine: plain loop {plain_shares[0]:.0%} (everything else {plain_shares[1]:.0%})", end="")
        if shares is not None:
            print(f"; Ray's worker {shares[0]:.0%} (everything else, Ray's own processes and the driver, {shares[1]:.0%})")
        else:
            print()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

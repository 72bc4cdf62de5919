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

from llava_platform.config.schema import TrainConfig
from llava_platform.train.window import Window
from llava_platform.train.worker import WorkerArgs

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already trained
    samples: int = 0
    tokens: int = 0  # over all ranks
    train_seconds: float = 0.0  # wall time of the optimizer steps, over all attempts
    data_wait_seconds: float = 0.0  # of it, waiting for input (mean over ranks)


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


def set_tf32(enabled: bool) -> bool:
    """Let CUDA run fp32 matmuls and cuDNN in TF32 (as HF's ``--tf32 True``). With ``enabled``
    false, or on a machine without CUDA, torch's own settings stay as they are. Returns whether this
    call turned TF32 on."""
    import torch

    if not enabled or not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.fp32_precision = "tf32"
    return True


def _setup_optimizer(objective, model):
    import torch

    t = objective.train
    return torch.optim.AdamW(objective.param_groups(model), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))


def _setup_scheduler(optimizer, t: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _micro_batches(shard, t: TrainConfig, epoch: int) -> Iterator[list[dict[str, Any]]]:
    from llava_platform.data.batching import length_grouped_batches

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


class _Timed:
    """An iterator that counts the seconds spent in its ``next`` calls (:meth:`take` them)."""

    def __init__(self, iterable):
        self._it = iter(iterable)
        self.seconds = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - start


def _mfu_setup(objective, model, t: TrainConfig):
    """The micro-batch FLOP counter and one device's peak FLOP/s, or (None, None) with a line saying
    why MFU is not reported (printed on GPUs only: on CPU it is expected)."""
    import torch

    from llava_platform.train.flops import peak_flops

    count = objective.flop_counter(model)
    peak, source = peak_flops(t.precision, t.peak_tflops)
    if count is None or peak is None:
        if torch.cuda.is_available():
            rank0_print(f"[train] MFU not reported: {source if count is not None else 'no FLOP count for this stage'}")
        return None, None
    return count, peak


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config["args"]`` is the run's
    :class:`~llava_platform.train.worker.WorkerArgs` (objective, typed job, total steps, MLflow run)."""
    import ray.train
    import torch

    from llava_platform.train.objectives import make_objective
    from llava_platform.train.strategy import DeepSpeedStrategy
    from llava_platform.tracking.runs import RunLogger, start_system_metrics, stop_system_metrics

    _quiet_third_party_notices()
    args: WorkerArgs = config["args"]
    objective = make_objective(args)
    t = objective.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed)
    set_tf32(t.tf32)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    model, counts = objective.build()
    count_flops, peak = _mfu_setup(objective, model, t)
    optimizer = _setup_optimizer(objective, model)
    scheduler = _setup_scheduler(optimizer, t, args.total_steps)
    strategy = DeepSpeedStrategy(t, args.deepspeed_overrides)
    strategy.prepare(model, optimizer, scheduler)
    logger = (RunLogger(args.tracking_uri, args.mlflow_run_id, args.tracking_spool, args.storage)
              if rank == 0 else None)
    monitor = None  # one system metrics monitor per node, on its first worker
    if args.system_metrics_interval_s and ctx.get_local_rank() == 0:
        monitor = start_system_metrics(args.tracking_uri, args.mlflow_run_id, f"node_{ctx.get_node_rank()}",
                                       args.system_metrics_interval_s)
    try:
        _train(objective, strategy, scheduler, args, logger, count_flops, peak, counts)
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)
    if logger is not None:
        logger.finish()


def _train(objective, strategy, scheduler, args: WorkerArgs, logger, count_flops, peak, counts) -> None:
    """Resume, train to ``total_steps``, report the summary, export."""
    import ray.train

    t = objective.train
    rank = ray.train.get_context().get_world_rank()
    total_steps = args.total_steps

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            strategy.load(d)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = TrainState(**json.load(f))
        rank0_print(f"[train] resumed at step {state.step}/{total_steps} (epoch {state.epoch},"
                    f" {state.micro_in_epoch} micro-batches into it)")
    else:
        rank0_print(f"[train] {t.stage}: {counts['trainable']:,} of {counts['total']:,} parameters train;"
                    f" {total_steps} optimizer steps")

    shard = ray.train.get_dataset_shard("train")
    trace_dir = args.trace_dir  # tests record the ids each step trained on

    # Between two logging steps every rank only adds up its own figures; the one collective that
    # averages them over the ranks runs on logging and checkpoint steps, not on every step.
    started = time.time()
    window = Window(time.time())
    step_ids: list[str] = []
    start_step = state.step
    while state.step < total_steps:
        micro = 0
        # Data wait: the time a step spends getting its input, rows from the shard and collation.
        rows_in = _Timed(_micro_batches(shard, t, state.epoch))
        for rows in rows_in:
            if micro < state.micro_in_epoch:
                micro += 1
                continue
            collate_start = time.perf_counter()
            batch = objective.collate(rows, strategy.device)
            window.wait += rows_in.take() + time.perf_counter() - collate_start
            if count_flops is not None:
                window.flops += count_flops(batch)
            loss = objective.loss(strategy.engine, batch)
            boundary = strategy.backward_and_step(loss)
            micro += 1
            state.micro_in_epoch = micro
            window.loss += loss.item() / strategy.accumulation_steps
            window.tokens += objective.tokens(batch)
            step_ids += [r["id"] for r in rows]
            if not boundary:
                continue
            state.step += 1
            window.steps += 1
            state.samples += t.global_batch_size
            if trace_dir:
                with open(os.path.join(trace_dir, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": state.step, "ids": step_ids}) + "\n")
            step_ids = []
            last = state.step >= total_steps
            log_now = state.step % t.logging_steps == 0 or last
            save_now = state.step % t.save_steps == 0 or last
            if log_now or save_now:
                # Every rank measures its probe on the same steps: the reduction below is collective.
                probes = objective.probe(strategy.engine, batch) if log_now else {}
                metrics = window.reduce(strategy, probes, t.global_batch_size, scheduler.get_last_lr()[0], peak)
                grad_norm = strategy.grad_norm()
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                state.tokens += window.reduced_tokens
                state.train_seconds += window.elapsed
                state.data_wait_seconds += window.reduced_wait
                if logger is not None and log_now:
                    logger.metrics(metrics, state.step)
                    eta = (time.time() - started) / (state.step - start_step) * (total_steps - state.step)
                    probe = "".join(f" | {k} {metrics[k]:.4f}" for k in sorted(probes))
                    mfu = f" | MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                    rank0_print(f"[train] step {state.step}/{total_steps} | loss {metrics['loss']:.4f}{probe}"
                                f" | lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.1f} samples/s"
                                f" | data wait {metrics['data_wait_s']:.2f}s{mfu}"
                                f" | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
                if save_now:
                    _save_checkpoint(strategy, state, metrics, rank, logger)
                window = Window(time.time())
            if last:
                break
        else:
            state.epoch += 1
            state.micro_in_epoch = 0
            continue
        break

    _summary(state, start_step, logger)
    model = _gather_for_export(strategy, objective)
    if model is not None:
        _publish(model, objective, args, logger)


def _summary(state: TrainState, start_step: int, logger) -> None:
    """Rank 0: the run's figures as one line and, in MLflow, the table ``summary.json``."""
    if logger is None:
        return
    rows = {
        "steps": state.step, "samples": state.samples, "tokens": state.tokens,
        "train_time_s": round(state.train_seconds, 2),
        "samples_per_s": round(state.samples / state.train_seconds, 3) if state.train_seconds else None,
        "tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
        "data_wait_s": round(state.data_wait_seconds, 2),
        "steps_this_attempt": state.step - start_step,
    }
    logger.table({k: [v] for k, v in rows.items()}, "summary.json")
    rank0_print("[train] summary: " + ", ".join(f"{k} {v}" for k, v in rows.items()))


def _quiet_third_party_notices() -> None:
    """What the worker's libraries print that a user can do nothing about: torch's deprecation of the
    collective DeepSpeed's ZeRO calls on every step, and MLflow's monitor saying it started, stopped
    and found no GPU. Their warnings and errors still show."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def _save_checkpoint(strategy, state: TrainState, metrics: dict[str, float], rank: int, logger) -> None:
    """Every rank saves its DeepSpeed shard into its own folder and every rank reports it; Ray Train
    gathers the folders into one checkpoint."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="ckpt-")
    try:
        strategy.save(tmp)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            if logger is not None:
                logger.tag("last_checkpoint_step", str(state.step))
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gather_for_export(strategy, objective):
    """The trained model to export, on rank 0 (None on the other ranks): ZeRO-3's partitioned weights
    gathered into a fresh full-size copy (collective: every rank takes part), LoRA merged, fp32."""
    import torch

    t = objective.train
    state_dict = strategy.gather_full_state_dict()
    if not strategy.is_rank0:
        return None
    if state_dict is not None or t.lora is not None:
        # A fresh full-size copy on rank 0 receives the gathered weights (and merges LoRA).
        model = objective.fresh_model()
        missing, unexpected = model.load_state_dict(state_dict if state_dict is not None else strategy.module.state_dict(),
                                                    strict=False)
        if unexpected or [m for m in missing if "lora" in m]:
            raise RuntimeError(f"export: state dict does not fit the model: {unexpected[:3]} {missing[:3]}")
    else:
        model = strategy.module
    model = objective.finalize(model)
    return model.to(torch.float32) if t.precision != "fp32" else model


def _publish(model, objective, args: WorkerArgs, logger) -> None:
    """Rank 0: the model in HF format, uploaded to the run's ``output_path`` whole or not at all,
    logged to MLflow and, where asked, registered as a new model version."""
    from llava_platform import storage

    t = objective.train
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "export")
        os.makedirs(export_dir)
        objective.export(model, export_dir)
        storage.publish_dir(export_dir, args.output_path, args.storage)  # whole or not at all
        if logger is not None:
            source = logger.artifacts(export_dir, "export")
            registered = args.registered_model_name
            if registered and source is not None:
                parent = args.parent_run_id
                desc = f"LLaVA stage {t.stage} ({args.run_name}), MLflow run {args.mlflow_run_id}"
                desc += f"; from stage-1 run {parent}" if parent else ""
                version = logger.register(registered, source, desc)
                if version is not None:
                    logger.tag("registered_model_version", f"{registered}/{version}")

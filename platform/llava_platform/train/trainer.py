"""The driver side of a training stage: check the data against the model, set up MLflow, build the
``TorchTrainer`` from the typed config, run it, and return where the results are."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from llava_platform import storage
from llava_platform.config.schema import STAGE_TEMPLATES, TrainJobConfig
from llava_platform.data.prepared import Manifest
from llava_platform.errors import LlavaPlatformError
from llava_platform.locations import absolute_paths
from llava_platform.train.worker import WorkerArgs


class TrainingError(LlavaPlatformError):
    """The training run cannot start (data and model do not match) or did not finish."""


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    output_path: str
    total_steps: int
    checkpoint_path: str | None


def steps_for(job: TrainJobConfig, records: int) -> int:
    """Optimizer steps: ``max_steps``, else epochs x (micro-batches per worker per epoch / accumulation)."""
    return steps_for_records(job.train, records)


def steps_for_records(t, records: int) -> int:
    """:func:`steps_for` for a ``TrainConfig``."""
    per_worker = records // t.num_workers
    micro_per_epoch = per_worker // t.micro_batch_size
    if micro_per_epoch == 0:
        raise TrainingError(
            f"{records} prepared records give no full micro-batch of {t.micro_batch_size} on each of"
            f" {t.num_workers} workers"
        )
    if t.max_steps:
        return t.max_steps
    return max(1, math.floor(t.epochs * micro_per_epoch / t.gradient_accumulation_steps))


def check_data_matches_model(job: TrainJobConfig, manifest: Manifest, tokenizer, model_config) -> None:
    """Refuse data prepared for another tokenizer, template or image geometry.

    Raises:
        TrainingError: with what differs and how to fix it.
    """
    from llava_platform.data.pipeline import tokenizer_fingerprint
    from llava_platform.data.images import num_image_tokens

    # Stage 1 trains on plain captions; stage 2 on conversations, in whichever template the data was
    # prepared with (vicuna_v1 by default, llava_v1 for data made for it), which the export records.
    template, stage = manifest.template, job.train.stage
    if (template == STAGE_TEMPLATES["pretrain"]) != (stage == "pretrain"):
        wanted = (f"{STAGE_TEMPLATES['pretrain']!r}" if stage == "pretrain"
                  else f"a conversation template ({STAGE_TEMPLATES['finetune']!r} by default)")
        raise TrainingError(f"{job.prepared_data} was prepared with template {template!r}, but stage {stage}"
                            f" trains with {wanted}; prepare it with stage {stage}")
    if manifest.tokenizer_sha256 != tokenizer_fingerprint(tokenizer):
        raise TrainingError(f"{job.prepared_data} was tokenized with a different tokenizer than the model's;"
                            " prepare the data with this model (data prepare --model ...)")
    spec = manifest.sample_spec
    if (spec.image_size, spec.num_image_tokens) != (model_config.vision_config.image_size,
                                                    num_image_tokens(model_config)):
        raise TrainingError(f"{job.prepared_data} holds {spec.image_size} px images with"
                            f" {spec.num_image_tokens} image tokens; the model wants"
                            f" {model_config.vision_config.image_size} px and {num_image_tokens(model_config)}")


# Reading the training shards needs one whole free CPU: read_parquet's file-listing step asks for
# 1 CPU whatever the read tasks' own num_cpus (seen with Ray 2.60; with less, training waits forever).
DATA_CPUS = 1.0


def check_room_for_data(worker_cpus: float) -> None:
    """Refuse a run whose workers would take every CPU: Ray Data could then never schedule a read
    task, and training would wait forever without a word.

    Raises:
        TrainingError: with the numbers and the fix.
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if total - worker_cpus < DATA_CPUS:
        raise TrainingError(
            f"the workers take {worker_cpus:g} of the cluster's {total:g} CPUs, leaving less than {DATA_CPUS:g} for"
            " reading the data; lower train.cpus_per_worker or train.num_workers, or add CPUs"
        )


def system_facts() -> dict[str, str]:
    """Versions and cluster shape, recorded on the MLflow run (as ``sys.*`` tags)."""
    import platform as std_platform  # the standard library's module (our source root is not a package)

    import deepspeed
    import ray
    import torch
    import transformers

    import llava_platform

    res = ray.cluster_resources()
    return {
        "sys.python": std_platform.python_version(),
        "sys.llava_platform": llava_platform.__version__,
        "sys.torch": torch.__version__,
        "sys.ray": ray.__version__,
        "sys.deepspeed": deepspeed.__version__,
        "sys.transformers": transformers.__version__,
        "sys.cluster_cpus": f"{res.get('CPU', 0):g}",
        "sys.cluster_gpus": f"{res.get('GPU', 0):g}",
        "sys.cluster_nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
        "sys.cuda": str(torch.version.cuda) if torch.cuda.is_available() else "none",
    }


def run_training(job: TrainJobConfig, deepspeed_overrides: dict[str, Any] | None = None,
                 trace_dir: str | None = None) -> TrainResult:
    """Run one LLaVA stage on Ray Train + DeepSpeed (Ray must be initialised).

    Re-running with the same ``name`` and ``storage_path`` resumes from the latest checkpoint and logs
    into the same MLflow run.

    Args:
        job: the validated job config.
        deepspeed_overrides: nested DeepSpeed keys merged over the generated config.
        trace_dir: a local directory (shared by the workers) where each rank appends, per optimizer
            step, the ids of the records it trained on (``rank<N>.jsonl``); for auditing data order
            across restarts. Off by default.

    Raises:
        TrainingError: data and model do not match, or training failed.
    """
    from llava_platform.data.prepared import open_prepared
    from llava_platform.model.builder import load_processor
    from llava_platform.tracking.models import producing_run_id
    from llava_platform.tracking.runs import resolve_tracking_uri, spool_path, use_tracking_uri

    job = absolute_paths(job)
    uri = resolve_tracking_uri(job.tracking)
    use_tracking_uri(uri)  # model URIs like runs:/... resolve against this server
    for key, where in (("storage_path", job.storage_path), ("output_path", job.output_path)):
        storage.check_writable(where, key, job.storage)  # now, not after the last step
    dataset, manifest = open_prepared(job.prepared_data, job.storage)
    processor, model_config = load_processor(job.model, job.storage)
    check_data_matches_model(job, manifest, processor.tokenizer, model_config)
    total_steps = steps_for(job, manifest.written)
    parent = producing_run_id(job.model.checkpoint, job.storage)  # stage 2 names its stage-1 run
    tags = {"stage1_run_id": parent} if parent else {}
    run_id = start_run(job.tracking, uri, job, job.storage_path, tags, job.storage)
    try:
        ckpt = fit(WorkerArgs(
            objective="llava", job=job, run_name=job.name, total_steps=total_steps, output_path=job.output_path,
            storage=job.storage, tracking_uri=uri, mlflow_run_id=run_id,
            tracking_spool=spool_path(job.storage_path, job.name),
            system_metrics_interval_s=job.tracking.system_metrics_interval_s,
            registered_model_name=job.tracking.registered_model_name, parent_run_id=parent,
            image_size=manifest.sample_spec.image_size, template=manifest.template,
            deepspeed_overrides=deepspeed_overrides, trace_dir=trace_dir), dataset, job.storage_path)
    except BaseException as e:  # failed, or interrupted: the MLflow run says so (a re-run resumes it)
        from llava_platform.tracking.runs import mark_failed

        mark_failed(uri, run_id, f"{type(e).__name__}: {e}")
        raise
    return TrainResult(job.name, run_id, uri, job.output_path, total_steps, ckpt)


def start_run(tracking, uri: str, job, storage_path: str, tags: dict[str, str], storage_config=None) -> str:
    """The MLflow run of training run ``job.name`` (one across retries and re-runs; params are the
    resolved config, tags the stage and the system's facts)."""
    from llava_platform.tracking.runs import ensure_run, flatten, replay_unlogged, spool_path

    artifact_root = None
    if uri.startswith("sqlite:///") and not tracking.artifact_location:
        artifact_root = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "artifacts")
    name = job.name
    tags = {"stage": job.train.stage, "llava_platform.run_name": name, **system_facts(), **tags}
    run_key = storage.join(storage_path, name)
    run_id = ensure_run(tracking, uri, run_key, name, flatten(json.loads(job.model_dump_json())), tags, artifact_root)
    replayed = replay_unlogged(uri, run_id, spool_path(storage_path, name), storage_config)
    if replayed:
        print(f"[train] tracking: replayed {replayed} metric values an earlier attempt could not log", flush=True)
    return run_id


def fit(args: WorkerArgs, dataset, storage_path: str) -> str | None:
    """Run the worker loop on Ray Train with ``dataset``, checkpoints under ``storage_path``; returns the
    last checkpoint's path. ``args`` travels to the workers whole, as the typed object (secrets stay
    ``SecretStr``).

    Raises:
        TrainingError: training failed.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llava_platform.train.loop import train_loop

    train, name, storage_config = args.job.train, args.run_name, args.storage
    check_room_for_data(train.num_workers * train.cpus_per_worker)
    arrow_fs, path = storage.arrow_filesystem(storage_path, storage_config)
    resources = {"CPU": train.cpus_per_worker, **train.resources_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources, accelerator_type=train.accelerator_type),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=arrow_fs if storage.is_remote(storage_path) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"train": dataset},
        # A fixed read order makes every epoch's micro-batches reproducible, so a resumed attempt can
        # skip exactly what was trained.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training run {name!r} failed: {e}") from e
    finally:
        for left in prune_unregistered_checkpoints(arrow_fs, f"{path.rstrip('/')}/{name}"):
            print(f"[train] removed an incomplete checkpoint folder (never registered): {left}")
    return result.checkpoint.path if result.checkpoint is not None else None


def prune_unregistered_checkpoints(fs, run_path: str) -> list[str]:
    """Remove the checkpoint folders of ``run_path`` that Ray Train never registered, and return them.

    Every worker uploads its shard into the step's folder, and Ray Train registers the checkpoint (in
    the run's checkpoint-manager snapshot, which resume reads) only once all of them have reported, so
    a resume never loads a partial one. A full disk, a lost node or a killed driver can still leave the
    folder of an upload that never completed; it is of no use and only takes space.
    """
    import pyarrow.fs as pafs
    from ray.train import Result

    # reading the snapshot back logs, at INFO, a paragraph on resuming from it: not news here
    manager_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = manager_log.level
    manager_log.setLevel(logging.WARNING)
    try:
        registered = {c.path.rstrip("/").rsplit("/", 1)[-1]
                      for c, _ in Result.from_path(run_path, storage_filesystem=fs).best_checkpoints}
    except RuntimeError:  # no run folder, or no snapshot: nothing was ever registered
        registered = set()
    finally:
        manager_log.setLevel(level)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.base_name not in registered:
            fs.delete_dir(info.path)
            removed.append(info.path)
    return removed


def run_stage(job: TrainJobConfig) -> TrainResult:
    """Entry points' library function: run and print where things are."""
    result = run_training(job)
    print(f"[train] done: {result.total_steps} steps; export at {result.output_path};"
          f" MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    return result

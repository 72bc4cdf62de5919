"""Job configs with their local paths made absolute, as Ray workers (which run in other directories)
need them: relative paths resolve against ``$LLAVA_WORKSPACE`` when set, else the working directory
(:func:`llava_platform.storage.absolute`); ``s3://``, MLflow URIs and hub ids stay as they are.
"""

from __future__ import annotations

import os
from typing import TypeVar

from llava_platform import storage
from llava_platform.config.components import ComponentsJobConfig
from llava_platform.config.schema import ModelSpec, PreprocessJobConfig, ServeConfig, TrainJobConfig
from llava_platform.errors import StorageError

Job = TypeVar("Job", PreprocessJobConfig, TrainJobConfig, ComponentsJobConfig)


def existing_path(value: str | None) -> str | None:
    """``value`` made absolute when it names an existing local path; None for a hub id
    (``openai/clip-vit-large-patch14-336`` looks like a relative path) or a URI."""
    if not value:
        return None
    try:
        path = storage.absolute(value)
    except StorageError:  # runs:/..., models:/..., and other schemes: not a local path
        return None
    return path if path and os.path.exists(path) else None


def model_paths(spec: ModelSpec) -> ModelSpec:
    """The spec with each of its sources that is an existing local path made absolute."""
    fields = ("checkpoint", "vision_tower", "llm", "tokenizer")
    return spec.model_copy(update={f: p for f in fields if (p := existing_path(getattr(spec, f)))})


def serve_paths(cfg: ServeConfig) -> ServeConfig:
    """The Serve app's args with an existing local model path made absolute."""
    path = existing_path(cfg.model)
    return cfg.model_copy(update={"model": path}) if path else cfg


def absolute_paths(job: Job) -> Job:
    """``job`` with its local inputs absolute and its outputs checked (:func:`storage.output_location`).

    Raises:
        StorageError: a relative output inside Ray's temporary copy of a job's working directory.
    """
    out = storage.output_location
    if isinstance(job, PreprocessJobConfig):
        data = job.data.model_copy(update={"data_path": storage.absolute(job.data.data_path),
                                           "image_root": storage.absolute(job.data.image_root)})
        return job.model_copy(update={"data": data, "output_path": out(job.output_path, "output_path"),
                                      "model": model_paths(job.model)})
    if isinstance(job, TrainJobConfig):
        return job.model_copy(update={
            "prepared_data": storage.absolute(job.prepared_data), "storage_path": out(job.storage_path, "storage_path"),
            "output_path": out(job.output_path, "output_path"), "model": model_paths(job.model)})
    if isinstance(job, ComponentsJobConfig):
        return job.model_copy(update={"world": storage.absolute(job.world), "output_path": out(job.output_path, "output_path"),
                                      "storage_path": out(job.storage_path, "storage_path")})
    raise TypeError(f"no paths to resolve in a {type(job).__name__}")

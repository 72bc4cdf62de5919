"""Prepared data at rest: the manifest a preprocessing run writes beside its Parquet shards, and the
reader training opens them with.

A prepared dataset is ``<uri>/manifest.json`` + ``<uri>/shards/status=ok/*.parquet`` (+ the rejected
rows under ``status=rejected`` and ``rejects.jsonl``). The manifest says how the samples were made (the
tokenizer's and template's hashes, the :class:`~llava_platform.data.sample.SampleSpec`) so training
can refuse data prepared for another model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llava_platform import storage
from llava_platform.config.schema import StorageConfig
from llava_platform.data.sample import SampleSpec
from llava_platform.errors import LlavaPlatformError

FORMAT = "llava-platform/prepared-v1"
MANIFEST_FILE = "manifest.json"
# The columns a training worker reads (the shards also hold the source row, status and reasons).
TRAIN_COLUMNS = ["id", "input_ids", "labels", "length", "has_image", "image"]


class PreprocessError(LlavaPlatformError):
    """The preprocessing job, or its output, cannot be used as asked."""


class Manifest(BaseModel):
    """What ``manifest.json`` holds (fields added later are ignored by older readers)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: str = FORMAT
    stage: str
    records_in: int
    written: int
    rejected: int
    rejects_by_reason: dict[str, int]
    # Written records that record_policy: llava changed, by kind (a record may count under several).
    normalised_by_kind: dict[str, int]
    template: str
    template_sha256: str
    tokenizer_sha256: str
    sample_spec: SampleSpec
    image_layout: dict[str, Any]
    sources: dict[str, str | None]
    shards: str = "shards/status=ok"
    # The job's resolved config (secrets masked).
    config: dict[str, Any]
    created_unix: int
    seconds: float = 0.0


def write_manifest(uri: str, manifest: Manifest, storage_config: StorageConfig | None = None) -> None:
    storage.write_bytes(storage.join(uri, MANIFEST_FILE), manifest.model_dump_json(indent=2).encode(), storage_config)


def read_manifest(uri: str, storage_config: StorageConfig | None = None) -> Manifest:
    """The manifest of a prepared dataset.

    Raises:
        PreprocessError: no manifest (not a prepared dataset, or a run that did not finish), or one
            this version cannot read.
    """
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST_FILE), storage_config)
    except FileNotFoundError as e:
        raise PreprocessError(f"{uri} has no {MANIFEST_FILE}: not a prepared dataset, or its run did not finish") from e
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        fields = ", ".join(sorted({".".join(map(str, err["loc"])) or "(the file)" for err in e.errors()}))
        raise PreprocessError(f"{uri}/{MANIFEST_FILE} is not a manifest this version reads (missing or invalid:"
                              f" {fields}); prepare the data again") from None


def open_prepared(uri: str, storage_config: StorageConfig | None = None):
    """Open prepared shards as a Ray Dataset (training columns only) with their manifest."""
    import ray.data

    manifest = read_manifest(uri, storage_config)
    fs, path = storage.arrow_filesystem(uri, storage_config)
    ds = ray.data.read_parquet(f"{path}/{manifest.shards}", filesystem=fs, columns=TRAIN_COLUMNS, num_cpus=0.25)
    return ds, manifest

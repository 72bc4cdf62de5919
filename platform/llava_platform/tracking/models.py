"""Model URIs and lineage: where a model named by a URI lies locally, and which run made it.

A model is named by a local path or hub id (passed through), an ``s3://`` URI (downloaded), or an MLflow
URI: ``runs:/<run id>[/<path>]`` (a run's artifacts; a bare run means its ``export``) or
``models:/<name>/<version>`` (a registered version), from the current tracking server. Every export this
platform writes carries ``training_info.json``: the run that made it and the run it started from.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from llava_platform import storage
from llava_platform.config.schema import StorageConfig
from llava_platform.errors import ModelBuildError

MLFLOW_SCHEMES = ("runs:/", "models:/")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LINEAGE_FILE = "training_info.json"


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a local path (or a hub id): neither MLflow nor remote storage."""
    return not is_mlflow_uri(uri) and not storage.is_remote(uri)


def resolve_model_uri(uri: str, storage_config: StorageConfig | None = None, weights: bool = True) -> str:
    """A local directory for a model URI (see the module's docstring); ``weights=False`` skips the
    weight files of a download (a Gateway needs the processor and config, not 14 GB of a 7B model).

    Raises:
        ModelBuildError: nothing found at the URI.
    """
    if is_mlflow_uri(uri):
        import mlflow.artifacts

        if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:
            uri = uri.rstrip("/") + "/export"  # a run's model export
        try:
            if weights:
                return mlflow.artifacts.download_artifacts(artifact_uri=uri)
            return _download_mlflow_without_weights(uri)
        except Exception as e:  # MlflowException, OSError: both mean "not there"
            raise ModelBuildError(f"cannot download {uri} from MLflow ({mlflow.get_tracking_uri()}): {e}") from e
    if storage.is_remote(uri):
        try:
            return storage.local_dir(uri, storage_config, skip_suffixes=() if weights else WEIGHT_SUFFIXES)
        except FileNotFoundError as e:
            raise ModelBuildError(f"nothing found at {uri}") from e
    return uri


def _download_mlflow_without_weights(uri: str) -> str:
    """The files of an MLflow model directory except its weights, in a new local directory."""
    import mlflow.artifacts

    root = tempfile.mkdtemp(prefix="llava-model-")
    pending, found = [""], False
    while pending:
        rel = pending.pop()
        for info in mlflow.artifacts.list_artifacts(artifact_uri=f"{uri.rstrip('/')}/{rel}".rstrip("/")):
            found = True
            name = info.path.rsplit("/", 1)[-1]
            child = f"{rel}/{name}".lstrip("/")
            if info.is_dir:
                pending.append(child)
            elif not name.endswith(WEIGHT_SUFFIXES):
                dest = os.path.join(root, os.path.dirname(child))
                os.makedirs(dest, exist_ok=True)
                mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{child}", dst_path=dest)
    if not found:
        raise FileNotFoundError(f"no artifacts at {uri}")
    return root


def write_lineage(export_dir: str, info: dict[str, Any]) -> None:
    """Record in an export which run made it (``mlflow_run_id``) and from what."""
    with open(os.path.join(export_dir, LINEAGE_FILE), "w") as f:
        json.dump(info, f, indent=2)


def read_lineage(uri: str, storage_config: StorageConfig | None = None) -> dict[str, Any]:
    """An export's ``training_info.json`` (local, s3:// or MLflow); {} for a model not trained here."""
    try:
        root = resolve_model_uri(uri, storage_config, weights=False) if is_mlflow_uri(uri) else uri
        return json.loads(storage.read_bytes(storage.join(root, LINEAGE_FILE), storage_config))
    except (FileNotFoundError, OSError, ValueError, ModelBuildError):
        return {}


def producing_run_id(uri: str | None, storage_config: StorageConfig | None = None) -> str | None:
    """The MLflow run that produced the model at ``uri``: the run of a ``runs:/`` URI, a registered
    version's run, or the export's lineage file; None when unknown."""
    if not uri:
        return None
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/")[0]
    if uri.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        name, _, version = uri[len("models:/"):].partition("/")
        try:
            return MlflowClient().get_model_version(name, version).run_id
        except Exception:  # MlflowException: no such version on this server
            return None
    return read_lineage(uri, storage_config).get("mlflow_run_id")

"""MLflow tracking for training runs: one MLflow run per training run, across retries and resumes.

The driver creates (or finds) the run before Ray Train starts, keyed by the training run's name and
storage path, and hands its id to the workers; rank 0 then logs into that same run, so a restarted
worker group or a re-run driver never makes a duplicate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llava_platform.config.schema import TrackingConfig
from llava_platform.errors import TrackingError

RUN_KEY_TAG = "llava_platform.run_key"


def tracking_uri(cfg: TrackingConfig, default_dir: str | os.PathLike | None = None) -> str:
    """Config, else ``MLFLOW_TRACKING_URI``, else a local SQLite store (the embedded default)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(default_dir or os.getcwd()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when an HTTP tracking server does not answer: MLflow's own
    client would retry for minutes, then fail with a traceback. Any HTTP answer (even 401/404)
    means a server is there; file and database URIs are not checked.

    Raises:
        TrackingError: nothing answers at ``uri`` within ``timeout_s``.
    """
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # URLError, refused, timeout, DNS, a malformed URI
        reason = getattr(e, "reason", e)
        raise TrackingError(f"the MLflow tracking server at {uri} is not reachable ({reason}); start it, or set "
                            "tracking.tracking_uri (or MLFLOW_TRACKING_URI) to one that is") from None


def use_tracking_uri(uri: str | None) -> None:
    """Point this process's MLflow client (``models:/``/``runs:/`` downloads) at ``uri``; None keeps
    ``MLFLOW_TRACKING_URI``/the default."""
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_run(cfg: TrackingConfig, uri: str, run_key: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str], artifact_root: str | None = None) -> str:
    """The id of the MLflow run for ``run_key``, created (with params and tags) if there is none yet."""
    client = _client(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location or artifact_root
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def mark_failed(uri: str, run_id: str, reason: str) -> None:
    """End the MLflow run as FAILED with ``reason`` (tag ``llava_platform.failure``), so a failed
    run is never left RUNNING. Best effort: a tracking error here must not hide the failure."""
    import logging

    try:
        client = _client(uri)
        client.set_tag(run_id, "llava_platform.failure", reason[:5000])
        client.set_terminated(run_id, status="FAILED")
    except Exception as e:  # noqa: BLE001 - the run's own failure is what the caller raises
        logging.getLogger(__name__).warning("could not mark MLflow run %s FAILED: %s", run_id, e)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class RunLogger:
    """Rank 0's handle on the MLflow run: metrics, artifacts, registration."""

    def __init__(self, uri: str, run_id: str):
        self.client = _client(uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def artifacts(self, local_dir: str, artifact_path: str) -> str:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"

    def register(self, name: str, source: str, description: str) -> str:
        """A new version of registered model ``name`` for a plain artifact directory (``register_model``
        refuses directories that are not MLflow logged models; ``create_model_version`` does not)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # exists
        version = self.client.create_model_version(name, source=source, run_id=self.run_id, description=description)
        return str(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

"""MLflow runs: one MLflow run per training (or evaluation) run, across retries and resumes.

The driver creates (or finds) the run before Ray Train starts, keyed by the training run's name and
storage path, and hands its id to the workers; rank 0 then logs into that same run, so a restarted
worker group or a re-run driver never makes a duplicate.
"""

from __future__ import annotations

import json
import os
import threading
import time
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


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """A job's MLflow URI: the config's, ``MLFLOW_TRACKING_URI``, or SQLite in ``./mlruns``.

    Raises:
        TrackingError: an HTTP tracking server that does not answer (checked before any work).
    """
    uri = tracking_uri(cfg, default_dir=os.path.join(os.getcwd(), "mlruns"))
    check_reachable(uri)
    return uri


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """A run's latest value of each metric."""
    return dict(_client(uri).get_run(run_id).data.metrics)


def metric_history(uri: str, run_id: str, key: str) -> list[float]:
    """Every logged value of ``key`` in a run, in step order."""
    return [m.value for m in sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


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


def _send(client: Any, run_id: str, metrics: list[Any], tags: dict[str, str]) -> None:
    """Log metrics (1000 per request, MLflow's limit) and tags; sent metrics leave ``metrics``."""
    from mlflow.entities import RunTag

    while metrics:
        batch = metrics[:1000]
        client.log_batch(run_id, metrics=batch)
        del metrics[:len(batch)]
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        tags.clear()


def spool_path(storage_path: str, run_name: str) -> str:
    """Where rank 0 keeps what it could not log (the tracking server was down) for a re-run to replay."""
    from llava_platform import storage

    return storage.join(storage_path, run_name, "unlogged_tracking.json")


class RunLogger:
    """Rank 0's handle on the MLflow run: metrics, artifacts, registration.

    Tracking is an observer, never on the critical path: :meth:`metrics` and :meth:`tag` only queue
    their values, and a background thread sends them (a training step never waits for the server).
    When the server stops answering, they stay queued and go with the next send that gets through
    (tried again at most every ``retry_every_s``, so a dead server costs training almost nothing);
    whatever is still unsent at :meth:`finish` is written to ``spool`` (see :func:`spool_path`), which
    the next run of the same name replays (:func:`replay_unlogged`). :meth:`flush` waits until what
    was queued has been sent (or could not be).
    """

    def __init__(self, uri: str, run_id: str, spool: str | None = None, storage_config: Any = None,
                 retry_every_s: float = 30.0):
        # MLflow's default (7 retries, backoff factor 2) spends ~4 minutes on each call to a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.client = _client(uri)
        self.uri, self.run_id = uri, run_id
        self.spool, self.storage_config = spool, storage_config
        self.retry_every_s = retry_every_s
        self.pending_metrics: list[Any] = []
        self.pending_tags: dict[str, str] = {}
        self.not_logged: list[str] = []  # what cannot be replayed later (artifacts, registration)
        self._down_until = 0.0
        self._warned = False
        self._lock = threading.Lock()  # the pending values
        self._io = threading.Lock()  # one client call at a time
        self._wake = threading.Event()
        self._stop = False
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        while not self._stop:
            self._wake.wait(1.0)
            self._wake.clear()
            self._flush()

    def _reachable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, error: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_every_s
        if not self._warned:
            self._warned = True
            print(f"[train] tracking: {what} could not be logged ({type(error).__name__}: {str(error)[:200]}); "
                  f"training goes on, metrics are kept and sent when {self.uri} answers again", flush=True)

    def _flush(self) -> bool:
        """Send what is pending; False if the server did not take it (the rest stays pending)."""
        with self._io:
            with self._lock:
                if not (self.pending_metrics or self.pending_tags):
                    return True
                if not self._reachable():
                    return False
                metrics, tags = self.pending_metrics, self.pending_tags
                self.pending_metrics, self.pending_tags = [], {}
            try:
                _send(self.client, self.run_id, metrics, tags)  # removes what it sent
            except Exception as e:  # noqa: BLE001 - any client error: keep the values, go on training
                self._failed("metrics", e)
                return False
            finally:
                with self._lock:
                    self.pending_metrics = metrics + self.pending_metrics
                    self.pending_tags = {**tags, **self.pending_tags}
        return True

    def flush(self) -> bool:
        """Send what is queued now (from this thread); False if the server did not take it."""
        return self._flush()

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending_metrics += [Metric(k, float(v), now, step) for k, v in values.items()]
        self._wake.set()

    def tag(self, key: str, value: str) -> None:
        with self._lock:
            self.pending_tags[key] = value
        self._wake.set()

    def table(self, rows: dict[str, list[Any]], artifact_file: str) -> None:
        """A table on the run's page (MLflow's ``log_table``: columns of equal length)."""
        try:
            with self._io:
                self.client.log_table(self.run_id, data=rows, artifact_file=artifact_file)
        except Exception as e:  # noqa: BLE001
            self._failed(f"table {artifact_file}", e)
            self.not_logged.append(f"table {artifact_file}")

    def artifacts(self, local_dir: str, artifact_path: str) -> str | None:
        """The artifacts' URI, or None when the server could not take them (noted in the report)."""
        try:
            with self._io:
                self.client.log_artifacts(self.run_id, local_dir, artifact_path)
                return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        except Exception as e:  # noqa: BLE001
            self._failed(f"artifacts {artifact_path}", e)
            self.not_logged.append(f"artifacts {artifact_path}/ (the export itself is written)")
            return None

    def register(self, name: str, source: str, description: str) -> str | None:
        """A new version of registered model ``name`` for a plain artifact directory (``register_model``
        refuses directories that are not MLflow logged models; ``create_model_version`` does not);
        None when the server could not take it (noted in the report)."""
        from mlflow.exceptions import MlflowException

        try:
            with self._io:
                try:
                    self.client.create_registered_model(name)
                except MlflowException:
                    pass  # exists (or the server is down: then the next call fails too)
                version = self.client.create_model_version(name, source=source, run_id=self.run_id,
                                                           description=description)
            return str(version.version)
        except Exception as e:  # noqa: BLE001
            self._failed(f"registration of {name}", e)
            self.not_logged.append(f"registration of {name}")
            return None

    def finish(self, status: str = "FINISHED") -> str | None:
        """End the run; returns a line saying what could not be logged (and where it was kept), or
        None when everything got through."""
        from llava_platform import storage

        self._stop = True
        self._wake.set()
        self._sender.join()
        self._down_until = 0.0  # one last try
        if self._flush():
            try:
                self.client.set_terminated(self.run_id, status=status)
                status = ""
            except Exception as e:  # noqa: BLE001
                self._failed("the run's end", e)
        if not (self.pending_metrics or self.pending_tags or status or self.not_logged):
            return None
        parts = [f"{len(self.pending_metrics)} metric values"] if self.pending_metrics else []
        parts += [f"{len(self.pending_tags)} tags"] if self.pending_tags else []
        parts += [f"the run's status {status}"] if status else []
        parts += self.not_logged
        line = f"[train] tracking: not logged to {self.uri}: {', '.join(parts)}"
        if self.spool and (self.pending_metrics or self.pending_tags or status):
            body = {"run_id": self.run_id, "status": status or None, "tags": self.pending_tags,
                    "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.pending_metrics]}
            try:
                storage.write_bytes(self.spool, json.dumps(body).encode(), self.storage_config)
                line += f"; kept in {self.spool}, replayed by the next run of the same name"
            except OSError as e:
                line += f"; could not keep them either ({e})"
        print(line, flush=True)
        return line


def start_system_metrics(uri: str, run_id: str, node_id: str, interval_s: float) -> Any | None:
    """Start MLflow's system metrics monitor for this node (CPU, memory, disk, network; GPU
    utilisation and memory where NVML finds GPUs), logged as ``system/<node_id>/<metric>`` every
    ``interval_s`` seconds, continuing the step count of an earlier attempt. Returns the monitor
    (call ``finish()``), or None, with one line saying why, when it cannot start: it is an observer."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=node_id, tracking_uri=uri,
                                       resume_logging=True)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001
        print(f"[train] tracking: no system metrics from {node_id} ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None


def stop_system_metrics(monitor: Any) -> None:
    """Stop a monitor from :func:`start_system_metrics`, logging the samples it took since its last
    report (MLflow's ``finish`` drops them: a run shorter than one interval would log none)."""
    try:
        monitor.finish()
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001
        print(f"[train] tracking: the last system metrics were not logged ({type(e).__name__}: {str(e)[:200]})",
              flush=True)


def replay_unlogged(uri: str, run_id: str, spool: str, storage_config: Any = None) -> int:
    """Log what an earlier attempt of this run kept in ``spool`` (see :class:`RunLogger`), then
    remove it; returns the number of metric values replayed (0: nothing kept)."""
    from mlflow.entities import Metric

    from llava_platform import storage

    try:
        body = json.loads(storage.read_bytes(spool, storage_config))
    except FileNotFoundError:
        return 0
    client = _client(uri)
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in body.get("metrics", [])]
    replayed = len(metrics)
    _send(client, run_id, metrics, dict(body.get("tags") or {}))
    if body.get("status"):
        client.set_terminated(run_id, status=body["status"])
    fs, path = storage.filesystem(spool, storage_config)
    fs.rm_file(path)
    return replayed

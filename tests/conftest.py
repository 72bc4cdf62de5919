"""Session-wide fixtures: a real S3-compatible server on loopback (moto's server mode, a separate
process speaking HTTP) and a small synthetic dataset.

Nothing here talks to any address but 127.0.0.1; instance-metadata lookups are disabled so that a
missing credential never makes botocore probe the network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, ready, what: str, log_name: str, timeout: float) -> None:
    """Poll ``ready()`` until it is true; fail early if ``proc`` exits, kill it on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log_name}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s; see {log_name}")


def stop_process(proc: subprocess.Popen, log, timeout: float = 15) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@dataclass
class S3Server:
    endpoint_url: str
    access_key_id: str = "testing-key"
    secret_access_key: str = "testing-secret"
    region: str = "us-east-1"

    def storage_config(self):
        from llava_platform.config.schema import StorageConfig

        return StorageConfig(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def new_bucket(self) -> str:
        import boto3

        name = f"b-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        ).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto's S3 server in its own process on a free loopback port, for the whole session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def accepts():
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    wait_until_ready(proc, accepts, "moto server", log.name, 60)
    yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    stop_process(proc, log)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The moto server's endpoint and credentials in the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    return s3_server


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An environment where botocore can find no credentials at all."""
    for var in list(os.environ):
        if var.startswith("AWS_") and var != "AWS_EC2_METADATA_DISABLED":
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic world shared by the session (read-only by convention)."""
    from llava_platform.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n=40, seed=3, n_eval=10)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny preset's tokenizer (do not mutate)."""
    from llava_platform.model.presets import build_preset

    return build_preset("tiny")[1].tokenizer


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, started and stopped here only.

    It is a ``ray.cluster_utils.Cluster`` so that multi-node tests can add and remove nodes. Its
    temp dir is private and short (Unix socket paths are limited to ~107 characters).
    """
    import shutil
    import tempfile

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    from llava_platform.serve import stall

    # The proxy's stall guard as the cluster files install it, with a timeout short enough for a test.
    os.environ[stall.CALLBACK_ENV] = stall.IMPORT_PATH
    os.environ[stall.TIMEOUT_ENV] = "3"
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir  # Ray writes its address file here, not in /tmp/ray
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    metrics_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        # Metrics reach the Prometheus endpoint every 2 s (Ray's default: 10 s), so the metrics test is quick.
        head_node_args={"num_cpus": 4, "include_dashboard": False, "temp_dir": temp_dir,
                        "metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 2000}},
    )
    cluster.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # the head node's Prometheus endpoint
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, object, str]:
    """A real ``mlflow server`` process on a loopback port (SQLite store and artifacts under
    ``root``, so a restart on the same port finds its runs again): (process, log file, URL)."""
    import urllib.request

    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200

    wait_until_ready(proc, healthy, "mlflow server", log.name, 90)
    return proc, log, url


@pytest.fixture(scope="session")
def mlflow_process():
    """For tests that stop and restart a server of their own: ``(start_mlflow_server, stop_process)``
    (``import conftest`` would find another folder's conftest in a whole-suite run)."""
    return start_mlflow_server, stop_process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on a free loopback port (SQLite store, local artifacts)."""
    proc, log, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_process(proc, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny preset (seed 1) saved in HF format, as a training export would be (read-only)."""
    from llava_platform.model.builder import save_model
    from llava_platform.model.presets import build_preset

    out = tmp_path_factory.mktemp("tiny_model")
    model, processor = build_preset("tiny", seed=1)
    save_model(model, processor, str(out))
    return out


@dataclass
class ServeApp:
    url: str
    model_dir: Path
    name: str
    args: object

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, self.name)


# Limits small enough that the bad-input tests can cross each one with small payloads.
SERVE_TEST_ARGS = dict(max_new_tokens_limit=64, max_image_bytes=300_000, max_image_pixels=1_000_000,
                       max_body_bytes=1_000_000, max_images_per_request=2, max_batch_size=8,
                       batch_wait_timeout_s=0.05)


@pytest.fixture(scope="session")
def serve_app(ray_cluster, tiny_model_dir):
    """One real Serve instance for the session: the LLaVA chat app on the tiny model, on loopback.

    Two replicas each of the encoder and the language model, so that killing one leaves the
    application answering; small CPU shares so that training tests still fit beside it.
    """
    from ray import serve

    from llava_platform.serve.app import LlavaAppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    args = LlavaAppArgs(model=str(tiny_model_dir), **SERVE_TEST_ARGS)
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build_app(args, {"Gateway": dict(small, num_replicas=1),
                           "VisionEncoder": dict(small, num_replicas=2, max_ongoing_requests=32),
                           "LanguageModel": dict(small, num_replicas=2, max_ongoing_requests=32)})
    serve.run(app, name="llava", route_prefix="/")
    yield ServeApp(f"http://127.0.0.1:{port}", tiny_model_dir, "llava", args)
    serve.shutdown()

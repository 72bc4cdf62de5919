from llava_platform.config.schema import TrackingConfig
from llava_platform.tracking.runs import RunLogger, ensure_run, flatten, tracking_uri


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:1"
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db"), tmp_path) == "sqlite:///x.db"


def test_one_run_per_key_and_plain_dir_registration(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = TrackingConfig(experiment="e")
    a = ensure_run(cfg, uri, "runs/x", "x", {"p": 1}, {"stage": "pretrain"}, str(tmp_path / "art"))
    b = ensure_run(cfg, uri, "runs/x", "x", {"p": 1}, {"stage": "pretrain"}, str(tmp_path / "art"))
    c = ensure_run(cfg, uri, "runs/y", "y", {}, {}, str(tmp_path / "art"))
    assert a == b != c
    log = RunLogger(uri, a)
    log.metrics({"loss": 2.0}, step=1)  # queued; a background thread sends it
    plain = tmp_path / "export"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    source = log.artifacts(str(plain), "export")
    assert log.register("m", source, "first") == "1"
    assert log.register("m", source, "second") == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert [v.description for v in client.search_model_versions("name='m'")][::-1] == ["first", "second"]
    assert log.finish() is None  # everything got through
    assert client.get_metric_history(a, "loss")[0].value == 2.0


def test_logging_never_waits_for_the_server(tmp_path):
    """A step's metrics are queued, not sent inline: a slow server delays the sender thread only."""
    import time

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run = ensure_run(TrackingConfig(experiment="e"), uri, "k", "k", {}, {})
    log = RunLogger(uri, run)
    sent = []
    real = log.client.log_batch

    def slow(*args, **kwargs):
        time.sleep(0.5)
        sent.append(kwargs)
        return real(*args, **kwargs)

    log.client.log_batch = slow
    start = time.time()
    for step in range(1, 21):
        log.metrics({"loss": 1.0 / step}, step)
    assert time.time() - start < 0.5  # 20 steps' metrics queued in less than one slow send
    assert log.finish() is None
    from mlflow.tracking import MlflowClient

    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run, "loss")) == list(range(1, 21))


def test_an_unreachable_tracking_server_fails_fast_with_one_clear_error(mlflow_server, tmp_path):
    """Measured before: an unreachable tracking_uri hung 257 s in MLflow's retries, then a traceback."""
    import socket
    import time

    import pytest

    from llava_platform.config.schema import TrackingConfig
    from llava_platform.errors import TrackingError
    from llava_platform.tracking.runs import check_reachable, resolve_tracking_uri

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with socket.socket() as silent:  # a server that accepts and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.time()
        with pytest.raises(TrackingError, match=f"{closed} is not reachable.*tracking.tracking_uri"):
            resolve_tracking_uri(TrackingConfig(tracking_uri=closed))
        with pytest.raises(TrackingError, match=f"{hung} is not reachable"):
            check_reachable(hung, timeout_s=1.0)
        assert time.time() - start < 15
    assert resolve_tracking_uri(TrackingConfig(tracking_uri=mlflow_server)) == mlflow_server
    check_reachable(f"sqlite:///{tmp_path}/mlflow.db")  # not a server: nothing to check


def test_metrics_survive_a_tracking_server_that_dies_and_are_replayed_when_it_returns(tmp_path, monkeypatch,
                                                                                    mlflow_process):
    """Measured before: an MLflow server that died mid-run failed the run after 642 s, with no export.
    Now rank 0's logger keeps what the server cannot take, costs training little while it is down,
    keeps the rest in a spool file at the end, and the next run of the same name replays it."""
    import time

    from mlflow.tracking import MlflowClient

    from llava_platform.tracking.runs import replay_unlogged, spool_path

    start_mlflow_server, stop_process = mlflow_process

    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
        monkeypatch.setenv(var, value)  # what RunLogger sets in rank 0's process; undone after this test
    proc, log, url = start_mlflow_server(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    run_id = ensure_run(TrackingConfig(experiment="dying"), url, "key", "dying", {}, {})
    spool = spool_path(str(tmp_path / "runs"), "dying")
    logger = RunLogger(url, run_id, spool=spool, retry_every_s=30)
    logger.metrics({"loss": 1.0}, 1)
    assert logger.flush()  # sent while the server is up
    stop_process(proc, log)  # the server dies mid-run
    start = time.time()
    logger.metrics({"loss": 0.9}, 2)  # queued: the sender's one failed try happens beside training...
    assert not logger.flush()  # (here: a send that cannot get through)
    for step in range(3, 50):
        logger.metrics({"loss": 1.0 / step}, step)  # ...then no tries until retry_every_s has passed
        assert not logger.flush()
    logger.tag("last_checkpoint_step", "49")
    assert time.time() - start < 30
    report = logger.finish()
    assert report and "48 metric values" in report and spool in report
    proc, log, _ = start_mlflow_server(tmp_path, port)  # the server is back, with the same store
    try:
        assert replay_unlogged(url, run_id, spool) == 48
        client = MlflowClient(url)
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 50))
        run = client.get_run(run_id)
        assert run.data.tags["last_checkpoint_step"] == "49" and run.info.status == "FINISHED"
        assert replay_unlogged(url, run_id, spool) == 0  # replayed once, then removed
    finally:
        stop_process(proc, log)

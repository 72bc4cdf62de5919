import os

from llava_platform.ray_utils import set_accelerator_env


def test_accelerator_env_respects_the_user(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    set_accelerator_env()
    import torch

    assert os.environ["DS_ACCELERATOR"] == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    set_accelerator_env()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def test_a_local_start_leaves_token_auth_to_ray_and_drops_only_its_notice(monkeypatch, tmp_path):
    """Measured before: init_ray set RAY_AUTH_MODE=token itself, after Ray had read its config, so
    Ray did not create the missing ~/.ray/auth_token and on a fresh machine the GCS aborted ("Check
    failed: has_token") and every job died at start. Now Ray's default is kept (token auth on, token
    created when missing), and only its notice about it is filtered."""
    import logging

    import ray

    from llava_platform import ray_utils

    seen = {}
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(mode=os.environ.get("RAY_AUTH_MODE"),
                                                             dashboard=kw["include_dashboard"]))
    ray_utils.init_ray(num_cpus=1)
    # and with the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
    # dashboard) about the controller every second, and without it printed a warning each time
    assert seen == {"mode": None, "dashboard": True}

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    records = [log.makeRecord(log.name, logging.WARNING, __file__, 1, msg, None, None) for msg in (
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
        "Token authentication is disabled for this Ray cluster. Anyone with network access ...")]
    assert [log.filter(r) for r in records] == [False, True]  # the "disabled" warning stays

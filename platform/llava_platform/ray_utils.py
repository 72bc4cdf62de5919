"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster in ``address``/``RAY_ADDRESS`` (as under ``ray job submit``), else start a
    local Ray. Idempotent.

    Ray Train's controller polls its workers every few seconds by default; polling faster makes each
    ``ray.train.report`` return in a fraction of a second instead of ~2 s (STACK-NOTES).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # HF tokenizers in this process, then forked workers: parallelism off (else a warning per worker).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_accelerator_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A new local cluster gets token authentication by default (Ray creates ~/.ray/auth_token when
        # missing) and a warning that says so on every start. Only the warning is dropped: setting
        # RAY_AUTH_MODE=token here instead would skip Ray's token creation (its config is read at
        # import) and the GCS of a fresh machine would abort for want of a token.
        _quiet_token_auth_notice()
        ray.init(num_cpus=num_cpus, include_dashboard=kwargs.pop("include_dashboard", True), **kwargs)


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_auth_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


def set_accelerator_env() -> None:
    """Tell DeepSpeed which accelerator this machine has (unless the user already did), so it does not
    probe and print its detection warning to stdout on every import."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False

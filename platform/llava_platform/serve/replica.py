"""What every model deployment's replica shares: loading the model it serves, its id, its health,
and telling a lost replica from any other failure."""

from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from llava_platform.config.schema import ServeConfig
from llava_platform.tracking.runs import use_tracking_uri

# A replica that died (killed, OOM, its node gone), could not be reached, or a deployment with none.
REPLICA_GONE = (RayActorError, DeploymentUnavailableError)


def load_model(args: ServeConfig) -> tuple[Any, Any]:
    """The served model and its processor (MLflow URIs resolve against ``args.tracking_uri``)."""
    from llava_platform.inference.engine import load_for_serving  # torch: not for the Gateway, which imports this module

    use_tracking_uri(args.tracking_uri)
    return load_for_serving(args.model, args.storage, args.dtype)


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


def replica_gone(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: a failed argument, a task error's cause) says that a
    replica went away, as opposed to a failure in the request itself."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, REPLICA_GONE):
            return True
        pending += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


class Unhealthy:
    """Records an internal failure (not a bad request) so ``check_health`` fails and Serve replaces
    the replica."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def check(self) -> None:
        if self.reason:
            raise RuntimeError(self.reason)

"""The Serve application: ``Gateway(VisionEncoder, LanguageModel)`` built from typed arguments.

``serve run serve_apps.llava_chat:app_builder model=DIR`` or ``serve run serve_apps/serve_config.yaml``;
replica counts, autoscaling and resources come from the Serve config, per deployment.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ConfigDict, model_validator
from ray.serve import Application

from llava_platform.config.schema import ServeConfig
from llava_platform.locations import serve_paths
from llava_platform.serve.encoder import VisionEncoder
from llava_platform.serve.gateway import API_KEY_ENV, Gateway
from llava_platform.serve.inputs import load_prompts
from llava_platform.serve.language_model import LanguageModel


DEPLOYMENTS = (Gateway, VisionEncoder, LanguageModel)
logger = logging.getLogger(__name__)


class LlavaAppArgs(ServeConfig):
    """Arguments of the LLaVA chat application (``model`` is the model URI: a local path, ``s3://``,
    ``models:/<name>/<version>`` or ``runs:/<run id>/<path>``); see :class:`ServeConfig`.

    These come from ``serve run``/``serve deploy``, and Ray writes them in clear into its logs, its
    dashboard and ``serve config``: so a literal ``api_key`` is refused here (and no error repeats
    the values it was given).
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    @model_validator(mode="after")
    def _no_literal_key(self) -> "LlavaAppArgs":
        if self.api_key is not None:
            raise ValueError(
                "api_key: Ray echoes the application's arguments in its logs, dashboard and `serve config`, "
                f"so the key must not be one of them; set {API_KEY_ENV} in every node's environment "
                "(infra/secrets/api_key on `ray up` clusters) or give api_key_file: a path, on the nodes, "
                "of a file that holds the key")
        return self


def cpu_shortfall(deployments: list[Any], cluster_cpus: float) -> str | None:
    """What to tell the user when the deployments' first replicas ask for more CPUs than the
    cluster has (Serve would otherwise wait for them silently), else None."""
    asks = []
    for d in deployments:
        cfg = d._deployment_config
        auto = cfg.autoscaling_config
        replicas = (auto.initial_replicas or auto.min_replicas or 1) if auto else (cfg.num_replicas or 1)
        cpus = float((d.ray_actor_options or {}).get("num_cpus", 1.0))
        asks.append((d.name, replicas, cpus))
    need = sum(r * c for _, r, c in asks)
    if need <= cluster_cpus:
        return None
    detail = ", ".join(f"{n}: {r} x {c:g} CPU" for n, r, c in asks)
    return (f"the application's replicas ask for {need:g} CPUs ({detail}) but the cluster has {cluster_cpus:g}: "
            "some replicas will not start until CPUs are added; lower num_cpus per deployment in the Serve config")


def build_app(args: LlavaAppArgs | ServeConfig, deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Bind the three deployments. A relative local model path is made absolute here, where the
    caller's working directory is known (replicas run elsewhere). The model's processor and config
    (not its weights) load here, for the Gateway's prompt builder: the model must be reachable where
    the application is built (in the cluster for a Serve config file; where ``serve run`` runs for an
    import path).

    Args:
        args: the application's arguments.
        deployment_options: per deployment name (``Gateway``, ``VisionEncoder``, ``LanguageModel``),
            ``.options(...)`` such as ``num_replicas`` or ``ray_actor_options``, for programmatic
            use; with ``serve run``/``serve deploy`` these come from the Serve config YAML instead.

    Raises:
        ValueError: an option for a deployment that does not exist.
    """
    opts = dict(deployment_options or {})
    unknown = set(opts) - {d.name for d in DEPLOYMENTS}
    if unknown:
        raise ValueError(f"deployment_options for unknown deployment(s) {sorted(unknown)}; "
                         f"the deployments are {[d.name for d in DEPLOYMENTS]}")
    gateway, encoder, llm = (d.options(**opts[d.name]) if d.name in opts else d for d in DEPLOYMENTS)
    import ray

    if ray.is_initialized():
        problem = cpu_shortfall([gateway, encoder, llm], ray.cluster_resources().get("CPU", 0.0))
        if problem:
            logger.warning(problem)
    # A plain ServeConfig: each replica unpickles its arguments, and LlavaAppArgs's module (this one)
    # imports all three deployments, torch with them, which the Gateway must not load.
    args = ServeConfig(**dict(serve_paths(args)))
    return gateway.bind(encoder.bind(args), llm.bind(args), args, load_prompts(args))

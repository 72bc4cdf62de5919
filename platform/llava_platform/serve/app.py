"""The Serve application: ``Gateway(VisionEncoder, LanguageModel)`` built from typed arguments.

``serve run serve_apps.llava_chat:app_builder model=DIR`` or ``serve run serve_apps/serve_config.yaml``;
replica counts, autoscaling and resources come from the Serve config, per deployment.
"""

from __future__ import annotations

import os

from ray.serve import Application

from llava_platform import storage
from llava_platform.config.schema import ServeConfig
from llava_platform.model.builder import MLFLOW_SCHEMES
from llava_platform.serve.deployments import Gateway, LanguageModel, VisionEncoder


class LlavaAppArgs(ServeConfig):
    """Arguments of the LLaVA chat application (``model`` is the model URI: a local path, ``s3://``,
    ``models:/<name>/<version>`` or ``runs:/<run id>/<path>``); see :class:`ServeConfig`."""


def build_app(args: LlavaAppArgs | ServeConfig) -> Application:
    """Bind the three deployments. A relative local model path is made absolute here, where the
    caller's working directory is known (replicas run elsewhere)."""
    local = not args.model.startswith(MLFLOW_SCHEMES) and not storage.is_remote(args.model)
    if local and os.path.exists(args.model):  # otherwise a hub id, passed through
        args = args.model_copy(update={"model": os.path.abspath(args.model)})
    return Gateway.bind(VisionEncoder.bind(args), LanguageModel.bind(args), args)

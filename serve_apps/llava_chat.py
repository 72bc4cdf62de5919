"""The LLaVA chat application for Ray Serve: an OpenAI-compatible API over two separately
autoscaled deployments (VisionEncoder, LanguageModel) behind a FastAPI Gateway.

Run it:
    serve run serve_apps.llava_chat:app_builder model=demo_run/stage2/export
    serve run serve_apps/serve_config.yaml          # replicas, autoscaling and resources from YAML
    serve deploy serve_apps/serve_config.yaml       # to a running cluster
"""

from ray.serve import Application

from llava_platform.serve.app import LlavaAppArgs, build_app


def app_builder(args: LlavaAppArgs) -> Application:
    """Typed app builder: Serve validates the config's ``args`` into :class:`LlavaAppArgs`."""
    return build_app(args)

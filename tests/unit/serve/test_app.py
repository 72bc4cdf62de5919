"""The app builder and the Serve config YAMLs, validated with Ray's own schema classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from llava_platform.serve.app import DEPLOYMENTS, LlavaAppArgs, build_app

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "serve_apps").glob("serve_config*.yaml"))


def test_both_configs_ship():
    assert {p.name for p in CONFIGS} == {"serve_config.yaml", "serve_config_cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_config_validates_and_autoscaling_builds(path):
    doc = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    assert path.read_text().startswith("# ") and "serve " in path.read_text().splitlines()[1]
    (app,) = schema.applications
    assert app.import_path == "serve_apps.llava_chat:app_builder"
    LlavaAppArgs.model_validate(app.args)  # a typo in args fails here, naming the field
    assert {d.name for d in app.deployments} == {d.name for d in DEPLOYMENTS}
    for d in app.deployments:
        auto = AutoscalingConfig(**d.autoscaling_config)
        assert 1 <= auto.min_replicas <= auto.max_replicas
        # Serve never scales up when the target equals max_ongoing_requests.
        assert d.max_ongoing_requests > auto.target_ongoing_requests, d.name
        opts = d.ray_actor_options
        if "cluster" in path.name and d.name != "Gateway":
            assert opts.num_gpus and opts.num_gpus > 0
        else:
            assert not opts.num_gpus and 0 < opts.num_cpus <= 1
    if "cluster" not in path.name:
        llm = next(d for d in app.deployments if d.name == "LanguageModel")
        assert llm.max_ongoing_requests >= app.args["max_batch_size"]  # a full batch can form


def test_the_import_path_builds_the_app_as_serve_does(tiny_model_dir):
    """Serve's own builder call (the one `serve run`/`serve deploy` make) with the YAML's args."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_apps.llava_chat import app_builder

    args = yaml.safe_load(CONFIGS[0].read_text())["applications"][0]["args"]
    app = call_user_app_builder_with_args_if_necessary(app_builder, {**args, "model": str(tiny_model_dir)})
    assert type(app).__name__ == "Application"
    with pytest.raises(Exception, match="max_batch_sise"):
        call_user_app_builder_with_args_if_necessary(app_builder, {**args, "max_batch_sise": 3})


def test_options_for_an_unknown_deployment_are_refused():
    with pytest.raises(ValueError, match="LanguageModle"):
        build_app(LlavaAppArgs(model="m"), {"LanguageModle": {"num_replicas": 2}})


def test_the_default_deployments_fit_two_cpus_and_a_shortfall_is_named():
    from llava_platform.serve.app import DEPLOYMENTS, cpu_shortfall

    assert cpu_shortfall(list(DEPLOYMENTS), 2.0) is None  # 0.25 + 0.5 + 1 (the README's serve run)
    big = [d.options(ray_actor_options={"num_cpus": 1}) for d in DEPLOYMENTS]
    msg = cpu_shortfall(big, 2.0)
    assert msg and "ask for 3 CPUs" in msg and "Gateway: 1 x 1 CPU" in msg and "has 2" in msg


def test_a_literal_api_key_in_the_app_args_is_refused_and_a_key_file_is_read(tmp_path, monkeypatch):
    """Ray writes an application's args in clear into its logs, dashboard and `serve config`."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from llava_platform.config.schema import ServeConfig
    from llava_platform.serve.gateway import api_key
    from serve_apps.llava_chat import app_builder

    with pytest.raises(Exception, match="LLAVA_API_KEY") as err:
        call_user_app_builder_with_args_if_necessary(app_builder, {"model": "m", "api_key": "sk-literal"})
    assert "api_key_file" in str(err.value) and "sk-literal" not in str(err.value)
    key = tmp_path / "api_key"
    key.write_text("sk-from-file\n")
    monkeypatch.setenv("LLAVA_API_KEY", "sk-from-env")
    assert api_key(LlavaAppArgs(model="m", api_key_file=str(key))) == b"sk-from-file"
    assert api_key(LlavaAppArgs(model="m")) == b"sk-from-env"
    assert api_key(ServeConfig(model="m", api_key="sk-programmatic")) == b"sk-programmatic"
    monkeypatch.delenv("LLAVA_API_KEY")
    assert api_key(LlavaAppArgs(model="m")) is None
    key.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        api_key(LlavaAppArgs(model="m", api_key_file=str(key)))
    with pytest.raises(ValueError, match="cannot be read"):
        api_key(LlavaAppArgs(model="m", api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(model="m", api_key="a", api_key_file=str(key))

import pytest
from pydantic import ValidationError

from llava_platform.config.schema import (
    STAGE_TEMPLATES,
    ModelSpec,
    ServeConfig,
    StorageConfig,
    TrainConfig,
)


def test_stage_templates_follow_llava():
    assert STAGE_TEMPLATES == {"pretrain": "plain", "finetune": "vicuna_v1"}  # LLaVA-1.5: --version plain / v1


@pytest.mark.parametrize(
    "fields, ok",
    [
        ({"preset": "tiny"}, True),
        ({"checkpoint": "/m"}, True),
        ({"vision_tower": "v", "llm": "l"}, True),
        ({}, False),
        ({"preset": "tiny", "checkpoint": "/m"}, False),
        ({"vision_tower": "v"}, False),
        ({"llm": "l"}, False),
    ],
)
def test_model_spec_needs_exactly_one_source(fields, ok):
    if ok:
        ModelSpec(**fields)
    else:
        with pytest.raises(ValidationError, match="model source|needs both"):
            ModelSpec(**fields)


def test_model_spec_defaults_are_llava_15():
    spec = ModelSpec(vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5")
    assert (spec.projector_type, spec.vision_feature_layer, spec.vision_feature_select_strategy) == (
        "mlp2x_gelu", -2, "default")


def test_train_config_rules():
    base = dict(stage="finetune", global_batch_size=128, micro_batch_size=4, num_workers=8, lr=2e-5)
    assert TrainConfig(**base).gradient_accumulation_steps == 4
    with pytest.raises(ValidationError, match="`lora` applies to stage `finetune` only"):
        TrainConfig(**{**base, "stage": "pretrain", "lora": {}})
    with pytest.raises(ValidationError, match="`offload_params` needs zero_stage 3"):
        TrainConfig(**{**base, "offload_params": True, "zero_stage": 2})
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(**{**base, "learning_rate": 1})


def test_assignment_is_validated():
    cfg = TrainConfig(stage="pretrain", global_batch_size=8, micro_batch_size=8, lr=1e-3)
    with pytest.raises(ValidationError):
        cfg.zero_stage = 5


def test_secrets_stay_out_of_repr():
    s = StorageConfig(access_key_id="AKIA", secret_access_key="very-secret")
    serve = ServeConfig(model="/m", api_key="sk-live-123")
    assert "very-secret" not in repr(s) and "very-secret" not in str(s.model_dump())
    assert "sk-live-123" not in repr(serve)


def test_local_paths_become_absolute_for_workers(tmp_path, monkeypatch):
    from llava_platform.config.schema import PreprocessJobConfig, TrainJobConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "init").mkdir(parents=True)
    job = TrainJobConfig(name="r", model={"checkpoint": "models/init"}, prepared_data="data/p",
                         storage_path="s3://b/runs", output_path="out",
                         train={"stage": "pretrain", "global_batch_size": 2, "micro_batch_size": 2, "lr": 1.0})
    a = job.with_absolute_paths()
    assert a.model.checkpoint == str(tmp_path / "models" / "init")
    assert (a.prepared_data, a.storage_path, a.output_path) == (str(tmp_path / "data/p"), "s3://b/runs", str(tmp_path / "out"))
    hub = ModelSpec(vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5")
    pre = PreprocessJobConfig(stage="pretrain", model=hub, data={"data_path": "d.json", "image_root": "imgs"},
                              output_path="o").with_absolute_paths()
    assert pre.model.vision_tower == "openai/clip-vit-large-patch14-336"  # a hub id, not a path
    assert pre.data.image_root == str(tmp_path / "imgs") and pre.output_path == str(tmp_path / "o")


def test_relative_paths_under_ray_job_submit_use_the_workspace_or_are_refused(tmp_path, monkeypatch):
    """Measured before: `ray job submit --working-dir .` with the smoke configs wrote outputs into
    Ray's temporary copy of the working directory, deleted after the job."""
    from llava_platform.config.schema import TrainJobConfig
    from llava_platform.errors import StorageError

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("LLAVA_WORKSPACE", raising=False)
    job = TrainJobConfig(name="r", model={"preset": "tiny"}, prepared_data="data/p", storage_path="runs",
                         output_path="/abs/out", train={"stage": "pretrain", "global_batch_size": 2,
                                                        "micro_batch_size": 2, "lr": 1.0})
    with pytest.raises(StorageError, match="storage_path 'runs' is relative.*temporary copy.*LLAVA_WORKSPACE"):
        job.with_absolute_paths()
    monkeypatch.setenv("LLAVA_WORKSPACE", str(tmp_path / "ws"))
    a = job.with_absolute_paths()
    assert (a.prepared_data, a.storage_path, a.output_path) == (
        str(tmp_path / "ws" / "data" / "p"), str(tmp_path / "ws" / "runs"), "/abs/out")
    monkeypatch.setenv("LLAVA_WORKSPACE", "s3://bucket/work")
    assert job.with_absolute_paths().storage_path == "s3://bucket/work/runs"
    monkeypatch.delenv("LLAVA_WORKSPACE")
    monkeypatch.chdir(tmp_path)  # an ordinary directory: relative paths as before
    assert job.with_absolute_paths().storage_path == str(tmp_path / "runs")

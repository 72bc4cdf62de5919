import pytest
from pydantic import ValidationError

from llava_platform.config.schema import STAGE_TEMPLATES, ModelSpec, ServeConfig, StorageConfig, TrainConfig


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

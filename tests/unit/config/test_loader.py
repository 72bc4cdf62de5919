import pytest

from llava_platform.config import PreprocessJobConfig, TrainConfig, TrainJobConfig, load_config
from llava_platform.config.loader import apply_overrides, parse_overrides
from llava_platform.errors import ConfigError

GOOD = """
name: run1
model: {preset: tiny}
prepared_data: /data/prepared
storage_path: /data/runs
output_path: /data/out
train:
  stage: finetune
  global_batch_size: 8
  micro_batch_size: 2
  num_workers: 2
  lr: 2.0e-5
"""


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_loads_and_applies_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), TrainJobConfig, ["train.lr=1e-4", "train.zero_stage=3", "model.seed=7"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.zero_stage == 3
    assert cfg.model.seed == 7
    assert cfg.train.gradient_accumulation_steps == 2


def test_typo_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, GOOD.replace("lr: 2.0e-5", "lr: 2.0e-5\n  warmup_ratoi: 0.03"))
    with pytest.raises(ConfigError) as e:
        load_config(p, TrainJobConfig)
    msg = str(e.value)
    assert str(p) in msg
    assert "unknown key `train.warmup_ratoi`" in msg
    assert "did you mean `train.warmup_ratio`?" in msg


def test_override_typo_is_reported_as_override(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean `train\.lr`") as e:
        load_config(write(tmp_path, GOOD), TrainJobConfig, ["train.lrr=1"])
    assert "--set" in str(e.value)


def test_wrong_type_says_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"`train.lr`: Input should be a valid number.*'fast'"):
        load_config(write(tmp_path, GOOD), TrainJobConfig, ["train.lr=fast"])


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"`train.precision`: Input should be 'bf16', 'fp16' or 'fp32'"):
        load_config(write(tmp_path, GOOD), TrainJobConfig, ["train.precision=fp8"])


def test_missing_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key `output_path`"):
        load_config(write(tmp_path, GOOD.replace("output_path: /data/out\n", "")), TrainJobConfig)


def test_cross_field_rule_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) must be a multiple of.*3 x 2 = 6"):
        load_config(write(tmp_path, GOOD), TrainJobConfig, ["train.micro_batch_size=3"])


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"), TrainJobConfig)


def test_yaml_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), TrainJobConfig)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", TrainJobConfig)


def test_unreadable_file(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(p, TrainJobConfig)


@pytest.mark.parametrize("item", ["noequals", "=3", "a..b=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides([item])


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=3", "c=true", "d=[x, y]", "e=", "f=hello"]) == [
        (["a", "b"], 3), (["c"], True), (["d"], ["x", "y"]), (["e"], None), (["f"], "hello")
    ]


def test_override_creates_sections_and_refuses_descending_into_values():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="`a.b` is a value, not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])


def test_config_from_overrides_only():
    cfg = load_config(None, PreprocessJobConfig,
                      ["stage=pretrain", "model.preset=tiny", "data.data_path=s3://b/x.json", "output_path=/o"])
    assert cfg.data.data_path == "s3://b/x.json"


def test_train_config_direct_validation_error_is_pydantic():
    # Validation outside the loader keeps pydantic's own error (the loader is where messages are shaped).
    with pytest.raises(ValueError):
        TrainConfig(stage="pretrain", global_batch_size=4, micro_batch_size=3, lr=1e-3)

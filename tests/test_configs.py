"""Every shipped config validates, and the smoke configs run."""

from pathlib import Path

import pytest

from llava_platform.config import ComponentsJobConfig, EvalJobConfig, PreprocessJobConfig, TrainJobConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
KINDS = {"preprocess": PreprocessJobConfig, "pretrain": TrainJobConfig, "finetune": TrainJobConfig,
         "evaluate": EvalJobConfig, "components": ComponentsJobConfig}


def kind_of(path: Path):
    return KINDS[path.stem.split("_")[0]]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path):
    load_config(path, kind_of(path))
    first = path.read_text().splitlines()[0:6]
    # Every config opens with the command that runs it.
    assert any(f"jobs/{path.stem.split('_')[0]}.py" in line or "jobs/" in line for line in first), first


def test_every_real_config_has_a_smoke_twin():
    real = [p for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_smoke")]
    assert real
    for p in real:
        # pretrain_7b.yaml -> pretrain_smoke.yaml; preprocess_lcs558k.yaml -> preprocess_lcs558k_smoke.yaml
        # components_small.yaml (the embedded default's stage 0) -> components_smoke.yaml
        twin = p.with_name(p.stem.removesuffix("_7b").removesuffix("_small") + "_smoke.yaml")
        assert twin.exists(), f"{p.name} has no smoke twin"
        assert kind_of(twin) is kind_of(p)


def test_the_stage0_config_file_is_what_the_demo_runs():
    from llava_platform.config.loader import validate
    from llava_platform.demo import stage0_settings

    shipped = load_config(CONFIGS / "components_small.yaml", ComponentsJobConfig)
    demo = validate(ComponentsJobConfig, {"world": "w", "output_path": "o", "storage_path": "s", **stage0_settings()},
                    "the demo's stage 0")
    for part in ("vision_tower", "language_model", "vision_tower_train", "language_model_train"):
        assert getattr(shipped, part) == getattr(demo, part), part

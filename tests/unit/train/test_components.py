"""Stage 0 on the session's Ray cluster: both parts train through the shared worker loop, land as plain
HF directories that compose into a LLaVA, log to MLflow, and are reused when nothing changed."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llava_platform.config import ComponentsJobConfig, ModelSpec, load_config
from llava_platform.model.builder import build_model
from llava_platform.train.components import ComponentsError, pretrain_components

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "jobs" / "configs" / "components_smoke.yaml"

pytestmark = pytest.mark.ray


def config(synth_dir, tmp_path, *extra):
    return load_config(SMOKE, ComponentsJobConfig, [
        f"world={synth_dir}", f"output_path={tmp_path / 'components'}", f"storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "vision_tower_train.max_steps=3",
        "language_model_train.max_steps=3", *extra])


def test_a_directory_that_is_no_world_is_refused(tmp_path):
    cfg = load_config(SMOKE, ComponentsJobConfig, [f"world={tmp_path}"])
    with pytest.raises(ComponentsError, match="not a synthetic world.*data synth"):
        pretrain_components(cfg)


def test_grouping_the_towers_rows_by_length_is_refused_by_name(tmp_path):
    from llava_platform.config.loader import ConfigError

    with pytest.raises(ConfigError, match="vision_tower_train.group_by_modality_length.*no length"):
        load_config(SMOKE, ComponentsJobConfig, [f"world={tmp_path}", "vision_tower_train.group_by_modality_length=true"])
    assert load_config(SMOKE, ComponentsJobConfig, [f"world={tmp_path}",
                                                    "language_model_train.group_by_modality_length=true"])


def test_components_train_compose_and_are_reused(ray_cluster, synth_dir, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    result = pretrain_components(config(synth_dir, tmp_path))
    vt, lm = result.vision_tower, result.language_model
    assert not vt.reused and not lm.reused and vt.steps == lm.steps == 3
    tower = CLIPVisionModel.from_pretrained(vt.path)
    assert (tower.config.image_size, tower.config.patch_size, tower.config.hidden_size) == (96, 32, 32)
    assert AutoModelForCausalLM.from_pretrained(lm.path).config.hidden_size == 32
    assert len(AutoTokenizer.from_pretrained(lm.path)) == len(AutoTokenizer.from_pretrained(result.tokenizer))
    client = MlflowClient(result.tracking_uri)
    for part in (vt, lm):
        run = client.get_run(part.mlflow_run_id)
        assert run.data.tags["stage"] == part.component and len(client.get_metric_history(run.info.run_id, "loss")) == 3
    # the dense objective's terms are logged beside the total
    assert {"contrastive_loss", "cell_loss", "position_loss"} <= set(vt.final_metrics)
    model, processor = build_model(ModelSpec(vision_tower=vt.path, llm=lm.path))
    assert model.config.image_seq_length == 9

    # same world and settings: nothing trains again, through the documented command
    from llava_platform.cli import main

    mtime = (Path(vt.path) / "model.safetensors").stat().st_mtime
    assert main(["model", "pretrain-components", "--config", str(SMOKE), "--world", str(synth_dir),
                 "--out", str(tmp_path / "components"), "--runs", str(tmp_path / "runs"),
                 "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "--set", "vision_tower_train.max_steps=3", "--set", "language_model_train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "vision_tower: reusing" in out and "language_model: reusing" in out
    assert "llava-platform model build --vision-tower" in out
    assert (Path(vt.path) / "model.safetensors").stat().st_mtime == mtime
    info = json.loads((Path(lm.path) / "component_info.json").read_text())
    assert info["steps"] == 3 and info["mlflow_run_id"] == lm.mlflow_run_id


def test_a_run_of_several_epochs_reads_its_rows_computed_once_in_order(ray_cluster):
    import ray.data
    from ray.data import DataContext
    from ray.data.dataset import MaterializedDataset

    from llava_platform.train.components import _materialized

    before = DataContext.get_current().execution_options.preserve_order
    ds = ray.data.range(64, override_num_blocks=8).map_batches(lambda b: {"id": b["id"] * 2})
    once = _materialized(ds)
    assert isinstance(once, MaterializedDataset)
    assert [r["id"] for r in once.iter_rows()] == [2 * i for i in range(64)]
    assert DataContext.get_current().execution_options.preserve_order == before

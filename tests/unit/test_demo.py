import pytest
from transformers import AutoModelForImageTextToText

from llava_platform.demo import run_demo

pytestmark = pytest.mark.ray


def test_demo_runs_the_pipeline_and_says_what_is_missing(ray_cluster, tmp_path, capsys):
    facts = run_demo(tmp_path, n=24, preset="tiny", steps=2)
    out = capsys.readouterr().out
    assert "NOT YET PART OF THE DEMO" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert facts["pretrain"]["prepared"] == 24 and facts["pretrain"]["steps"] == 2
    assert facts["finetune"]["steps"] == 2
    model = AutoModelForImageTextToText.from_pretrained(facts["finetune"]["export"])
    assert model.config.vision_config.image_size == 32

import math

from transformers import AutoModelForImageTextToText

from llava_platform.demo import run_demo


def test_demo_runs_what_exists_and_says_what_does_not(tmp_path, capsys):
    facts = run_demo(tmp_path, n=16, batch_size=4)
    out = capsys.readouterr().out
    assert "NOT YET PART OF THE DEMO" in out
    assert facts["pretrain"]["trainable"] == facts["pretrain"]["projector_trainable"]
    assert facts["finetune"]["vision_tower_trainable"] == 0
    assert all(math.isfinite(facts[s]["loss"]) for s in ("pretrain", "finetune"))
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "model").config.vision_config.image_size == 64

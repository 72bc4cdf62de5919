import json

import httpx
import pytest
from transformers import AutoModelForImageTextToText

from llava_platform.demo import run_demo

pytestmark = pytest.mark.ray


def test_demo_runs_the_whole_pipeline_and_answers_a_request(ray_cluster, tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # used only if this test starts Serve (run alone)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    small = [f"{part}.{k}={v}" for part in ("vision_tower", "language_model")
             for k, v in (("hidden_size", 32), ("layers", 1), ("heads", 2))]
    batches = [f"{run}_train.{k}={v}" for run in ("vision_tower", "language_model")
               for k, v in (("global_batch_size", 8), ("micro_batch_size", 4))]
    facts = run_demo(tmp_path, n=24, steps=2, finetune_steps=2, tower_steps=2, lm_steps=2, n_eval=4,
                     components=[*small, "language_model.vocab_size=400", *batches], serve_port=port, wait=False)
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "llava-platform chat --endpoint" in out
    assert "| colour | 4 |" in out and "blind accuracy" in out
    assert facts["pretrain"]["prepared"] == 24 and facts["pretrain"]["steps"] == 2
    assert facts["finetune"]["steps"] == 2
    # stage 0 made both parts, and stage 1 logged its image-vs-blank probe
    assert {p["steps"] for p in facts["components"].values()} == {2}
    assert set(facts["pretrain"]["image_vs_blank"]) == {"real", "blank", "points"}
    assert "stage-1 loss with real images" in out
    assert f"chat in your browser (drop in an image, ask, follow up): {facts['url']}/" in out
    assert facts["request"]["answer"] is not None and f"A: {facts['request']['answer']!r}" in out
    assert {"accuracy", "blind_accuracy", "accuracy.colour"} <= set(facts["eval"])
    assert (tmp_path / "eval" / "accuracy_by_category.png").exists()
    assert len((tmp_path / "eval" / "answers.jsonl").read_text().splitlines()) == 20
    model = AutoModelForImageTextToText.from_pretrained(facts["finetune"]["export"])
    assert model.config.vision_config.image_size == 96 and model.config.image_seq_length == 9
    # wait=False removed the demo's app; whatever else runs on Serve is untouched.
    assert httpx.get(facts["url"] + "/healthz").status_code == 404
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["answers"] == 20

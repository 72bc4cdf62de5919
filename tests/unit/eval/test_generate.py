"""Question files, and the answer actor run directly (no Ray): both modes, errors kept per question."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import reference_greedy

from llava_platform.config.schema import EvalConfig, ModelSpec, StorageConfig
from llava_platform.data.images import ImageSpec
from llava_platform.eval.generate import AnswerModel, EvalError, read_questions
from llava_platform.inference.engine import load_for_serving


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_question_file_errors_name_the_line(tmp_path):
    good = json.dumps({"question_id": 1, "image": "a.png", "text": "q"})
    assert read_questions(_write(tmp_path / "q.jsonl", [good, ""]))[0]["question_id"] == 1
    with pytest.raises(EvalError, match="line 2: not valid JSON"):
        read_questions(_write(tmp_path / "q.jsonl", [good, "{oops"]))
    with pytest.raises(EvalError, match="missing image"):
        read_questions(_write(tmp_path / "q.jsonl", [json.dumps({"question_id": 2, "text": "q"})]))
    with pytest.raises(EvalError, match="appears twice"):
        read_questions(_write(tmp_path / "q.jsonl", [good, good]))
    with pytest.raises(EvalError, match="cannot read"):
        read_questions(str(tmp_path / "none.jsonl"))


def test_answer_actor_answers_with_and_without_the_image(tiny_model_dir, synth_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "eval" / "images", images)
    (images / "broken.png").write_bytes(b"not a png")
    questions = read_questions(str(synth_dir / "eval" / "questions.jsonl"))[:3]
    cfg = EvalConfig(questions="-", image_root=str(images), output_dir="-", max_new_tokens=6)
    actor = AnswerModel(ModelSpec(checkpoint=str(tiny_model_dir)), cfg, StorageConfig(), "tiny")
    batch = {k: np.array([str(q[k]) for q in questions] + [v]) for k, v in
             (("question_id", "x"), ("image", "broken.png"), ("text", "what?"), ("category", "colour"))}
    out = actor(batch)
    assert out["mode"] == ["image", "blind"] * 4
    assert out["error"][6].startswith("undecodable_image") and out["error"][7] is None  # blind still answers
    assert set(out) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    model, processor = load_for_serving(str(tiny_model_dir))
    spec = ImageSpec.from_model(model.config, processor)
    q = questions[0]
    raw = (images / q["image"]).read_bytes()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
    assert out["text"][0] == reference_greedy(model, processor, spec, messages, [raw], 6).strip()
    blind = reference_greedy(model, processor, spec, [{"role": "user", "content": q["text"]}], [], 6).strip()
    assert out["text"][1] == blind

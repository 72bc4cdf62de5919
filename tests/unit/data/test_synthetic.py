import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llava_platform.data import scenes, synthetic
from llava_platform.data.conversation import llava_turns_to_messages


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    synthetic.write_dataset(tmp_path / "a", n=12, seed=5, n_eval=4)
    synthetic.write_dataset(tmp_path / "b", n=12, seed=5, n_eval=4)
    synthetic.write_dataset(tmp_path / "c", n=12, seed=6, n_eval=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_files_and_formats(synth_dir):
    pretrain = json.loads((synth_dir / "pretrain.json").read_text())
    instruct = json.loads((synth_dir / "instruct.json").read_text())
    questions = [json.loads(x) for x in (synth_dir / "eval" / "questions.jsonl").read_text().splitlines()]
    answers = [json.loads(x) for x in (synth_dir / "eval" / "answers_key.jsonl").read_text().splitlines()]
    assert len(pretrain) == 40 and len(questions) == len(answers) == 10 * len(synthetic.EVAL_CATEGORIES)
    for rec in pretrain + instruct:
        llava_turns_to_messages(rec["conversations"], bool(rec.get("image")))  # raises if invalid
        if rec.get("image"):
            assert (synth_dir / "images" / rec["image"]).is_file()
    ids = [r["id"] for r in pretrain + instruct]
    assert len(ids) == len(set(ids))
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        assert (synth_dir / "eval" / "images" / q["image"]).is_file()
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert {q["category"] for q in questions} >= {"colour", "shape", "count", "position"}


def test_pretrain_is_caption_style_with_image_at_start_or_end(tmp_path):
    synthetic.write_dataset(tmp_path, n=60, seed=1, n_eval=1)
    pretrain = json.loads((tmp_path / "pretrain.json").read_text())
    firsts = [r["conversations"][0]["value"] for r in pretrain]
    assert all(len(r["conversations"]) == 2 for r in pretrain)
    assert any(v.startswith("<image>") for v in firsts) and any(v.endswith("<image>") for v in firsts)


def test_instruct_has_all_kinds_multi_turn_and_text_only(tmp_path):
    synthetic.write_dataset(tmp_path, n=90, seed=2, n_eval=1)
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    text_only = [r for r in instruct if "image" not in r]
    assert text_only and all(r["id"].startswith("text-") for r in text_only)
    assert any(len(r["conversations"]) > 2 for r in instruct)
    firsts = " ".join(r["conversations"][0]["value"] for r in instruct)
    assert "Describe" in firsts or "detailed" in firsts
    assert "Explain" in firsts or "why" in firsts


def test_eval_images_never_in_training(synth_dir):
    train_imgs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (synth_dir / "images").iterdir()}
    eval_imgs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (synth_dir / "eval" / "images").iterdir()}
    referenced = {r["image"] for f in ("pretrain.json", "instruct.json")
                  for r in json.loads((synth_dir / f).read_text()) if r.get("image")}
    assert not train_imgs & eval_imgs
    assert not referenced & {p.name for p in (synth_dir / "eval" / "images").iterdir()}


def test_answer_key_matches_question(tmp_path):
    synthetic.write_dataset(tmp_path, n=1, seed=9, n_eval=30)
    answers = [json.loads(x) for x in (tmp_path / "eval" / "answers_key.jsonl").read_text().splitlines()]
    by_cat = Counter(a["category"] for a in answers)
    assert set(by_cat.values()) == {30}
    for a in answers:
        if a["category"] == "colour":
            assert a["answer"] in scenes.COLOURS
        elif a["category"] == "shape":
            assert a["answer"] in scenes.SHAPES
        elif a["category"] == "count":
            assert a["answer"] in {"1", "2", "3"}
        elif a["category"] == "yes_no":
            assert a["answer"] in {"yes", "no"}
    yes = sum(a["answer"] == "yes" for a in answers if a["category"] == "yes_no")
    assert 5 <= yes <= 25  # both answers occur; not all one way


def test_corpus_covers_the_world():
    text = " ".join(synthetic.corpus(seed=0, n_scenes=50))
    for word in list(scenes.SHAPES) + list(scenes.COLOURS) + ["ASSISTANT", "USER"]:
        assert word in text


def test_images_are_rgb_png(synth_dir):
    with Image.open(next((synth_dir / "images").iterdir())) as im:
        assert im.format == "PNG" and im.mode == "RGB"


def test_shape_counts_choose_how_many_shapes_a_scene_holds(tmp_path):
    synthetic.write_dataset(tmp_path / "one", n=30, seed=1, n_eval=10, shape_counts=(1,))
    for f in ("scenes.jsonl", "eval/scenes.jsonl"):
        rows = [json.loads(x) for x in (tmp_path / "one" / f).read_text().splitlines()]
        assert {len(r["shapes"]) for r in rows} == {1}
    with pytest.raises(ValueError, match="shape_counts must be drawn from 1, 2 and 3"):
        synthetic.write_dataset(tmp_path / "bad", n=3, shape_counts=(4,))

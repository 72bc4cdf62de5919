"""Every question the synthetic world asks has exactly one right answer in its scene.

The check is independent of the generator: it reads the written files (questions in the training
conversations and the held-out eval files, each scene from ``scenes.jsonl``), parses each question's
referent back into attributes, finds the shapes in the scene that match, and requires exactly one, whose
attribute is the answer given.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from llava_platform.data import scenes, synthetic
POSITIONS = sorted({scenes.Shape("circle", "red", "small", r, c).position for r in range(3) for c in range(3)},
                   key=len, reverse=True)


def matches(referent: str, shapes: list[dict]) -> list[dict]:
    """The shapes a referent phrase ("triangle", "red object", "shape at the top left", ...) names."""
    words = referent.split()
    position = next((p for p in POSITIONS if referent.endswith("at the " + p)), None)
    colour = next((w for w in words if w in scenes.COLOURS), None)
    kind = next((w for w in words if w in scenes.SHAPES), None)
    if position is None and colour is None and kind is None:
        assert referent in ("shape", "object"), referent
    return [s for s in shapes if (position is None or s["position"] == position)
            and (colour is None or s["colour"] == colour) and (kind is None or s["kind"] == kind)]


QUESTION = {
    "colour": re.compile(r"^What colour is the (?P<ref>.+)\?$"),
    "shape": re.compile(r"^What shape is the (?P<ref>.+)\?$"),
    "position": re.compile(r"^Where is the (?P<ref>.+)\?$"),
    "yes_no": re.compile(r"^Is there an? (?P<ref>\w+ \w+) in the image\?$"),
    "count": re.compile(r"^How many shapes are in the image\?$"),
}
ATTRIBUTE = {"colour": "colour", "shape": "kind", "position": "position"}


def check(question: str, answer: str, shapes: list[dict]) -> str | None:
    """The question's category after checking its answer against the scene; None for questions
    that are not about one attribute (descriptions, reasoning)."""
    question = question.replace("<image>", "").replace(synthetic.SHORT, "").strip()
    for category, pattern in QUESTION.items():
        m = pattern.match(question)
        if m is None:
            continue
        answer_words = answer.lower().rstrip(".")
        if category == "count":
            assert answer in (str(len(shapes)), ) or scenes.NUMBER_WORDS[len(shapes)] in answer_words, question
            return category
        found = matches(m["ref"], shapes)
        if category == "yes_no":
            expected = "yes" if found else "no"
            assert answer_words.split(",")[0] == expected, (question, answer, shapes)
            return category
        assert len(found) == 1, f"{question!r} names {len(found)} shapes in {shapes}"
        value = found[0][ATTRIBUTE[category]]
        if answer == value:
            return category
        # a long answer ("The triangle is red.") names the right value and no other of its kind
        vocab = {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "position": POSITIONS}[category]
        named = [v for v in vocab if re.search(rf"\b{v}\b", answer_words)]
        assert value in named, (question, answer, shapes)
        if category != "position":
            assert len([v for v in named if v not in m["ref"].split()]) == 1, (question, answer, shapes)
        return category
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthetic.write_dataset(out, n=3000, seed=11, n_eval=1000)
    return out


def scenes_of(path) -> dict[str, list[dict]]:
    return {r["image"]: r["shapes"] for r in map(json.loads, path.read_text().splitlines())}


def test_every_training_question_has_one_answer(world):
    scenes = scenes_of(world / "scenes.jsonl")
    asked: Counter = Counter()
    for record in json.loads((world / "instruct.json").read_text()):
        if "image" not in record:
            continue
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            asked[check(human["value"], gpt["value"], scenes[record["image"]])] += 1
    assert all(asked[c] > 500 for c in QUESTION), asked  # every category is asked, and often


def test_every_eval_question_has_one_answer(world):
    scenes = scenes_of(world / "eval" / "scenes.jsonl")
    questions = [json.loads(x) for x in (world / "eval" / "questions.jsonl").read_text().splitlines()]
    key = {a["question_id"]: a for a in map(json.loads, (world / "eval" / "answers_key.jsonl").read_text().splitlines())}
    by_category: Counter = Counter()
    for q in questions:
        category = check(q["text"], key[q["question_id"]]["answer"], scenes[q["image"]])
        assert category == q["category"]
        by_category[category] += 1
    assert set(by_category.values()) == {1000}
    yes = sum(key[q["question_id"]]["answer"] == "yes" for q in questions if q["category"] == "yes_no")
    assert 400 < yes < 600  # both answers, about equally often


def test_ambiguous_references_are_never_made():
    """A scene with two triangles and two red shapes: neither 'the triangle' nor 'the red object'."""
    import random

    scene = scenes.Scene((scenes.Shape("triangle", "red", "small", 0, 0),
                             scenes.Shape("triangle", "blue", "large", 1, 1),
                             scenes.Shape("circle", "red", "small", 2, 2)), "white", 128, 128, ((0, 0),) * 3)
    for seed in range(50):
        for _, question, _, _ in synthetic.qa_pairs(scene, random.Random(seed)):
            assert "the triangle?" not in question and "the red object" not in question and "red shape" not in question


def test_scene_records_describe_the_drawn_shapes(world):
    from PIL import Image

    first = json.loads((world / "scenes.jsonl").read_text().splitlines()[0])
    img = Image.open(world / "images" / first["image"]).convert("RGB")
    for s in first["shapes"]:
        x, y = s["center"]
        assert img.getpixel((int(x), int(y))) == scenes.COLOURS[s["colour"]]

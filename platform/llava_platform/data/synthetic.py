"""The synthetic world: scenes of simple shapes whose answers can only be known by looking.

A scene holds 1-3 shapes (6 kinds, 6 colours, two sizes) placed in distinct cells of a 3x3 grid on
one of several backgrounds. From scenes we write the LLaVA formats:

- ``pretrain.json``: LCS-558K-style caption conversations (stage 1);
- ``instruct.json``: stage 2's mix, like LLaVA-1.5's mix665k: short-answer VQA turns (half the
  records), LLaVA-Instruct-style conversations, detailed descriptions and reasoning, plus a few
  text-only samples;
- ``eval/questions.jsonl`` (LLaVA model_vqa format) + ``eval/answers_key.jsonl`` on held-out images.

Everything is a pure function of the seed, so two runs with the same seed write the same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from llava_platform.data.scenes import (
    COLOURS,
    CORNERS,
    NUMBER_WORDS,
    SHAPE_COUNTS,
    SHAPES,
    Scene,
    Shape,
    random_scene,
    render,
    save_image,
    scene_record,
)

SHORT = "Answer the question using a single word or phrase."
EVAL_CATEGORIES = ("colour", "shape", "count", "position", "yes_no")

CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
    "What is in the photo?",
    "Share a concise interpretation of the image provided.",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "What do you see happening in this image? Describe every object.",
    "Give a detailed description of the scene, including positions and colours.",
)
TEXT_ONLY = (
    ("How many corners does a triangle have?", "A triangle has three corners."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What colour do you get by mixing blue and yellow paint?", "Mixing blue and yellow paint gives green."),
    ("What colour do you get by mixing red and blue paint?", "Mixing red and blue paint gives purple."),
    ("Is a square a kind of rectangle?", "Yes. A square is a rectangle whose four sides are equal."),
    ("Which has more corners, a star or a square?", "A five-pointed star has ten corners, more than the four of a square."),
    ("Name three warm colours.", "Red, orange and yellow are warm colours."),
)


# ---------------------------------------------------------------------------------------------
# Text about a scene
# ---------------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an orange star", "a red circle")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _list_phrase(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    parts = [_a(f"{s.size} {s.name}") if rng.random() < 0.3 else _a(s.name) for s in scene.shapes]
    style = rng.randrange(3)
    if style == 0:
        return f"{_list_phrase(parts).capitalize()} on a {scene.background} background."
    if style == 1:
        located = [f"{p} at the {s.position}" for p, s in zip(parts, scene.shapes)]
        return f"{_list_phrase(located).capitalize()}."
    n = len(scene.shapes)
    return f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {_list_phrase(parts)}."


def detailed_description(scene: Scene) -> str:
    n = len(scene.shapes)
    lines = [f"The image shows {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} on a {scene.background} background."]
    for s in scene.shapes:
        lines.append(f"There is {_a(s.size + ' ' + s.name)} at the {s.position} of the image.")
    return " ".join(lines)


def _unique(scene: Scene, attr: str, value: str) -> bool:
    return sum(getattr(s, attr) == value for s in scene.shapes) == 1


def colour_referent(scene: Scene, s: Shape) -> str:
    """How a colour question names ``s``: by an attribute no other shape in the scene shares."""
    if len(scene.shapes) == 1:
        return "shape"
    if _unique(scene, "kind", s.kind):
        return s.kind
    return f"shape at the {s.position}"  # positions are distinct grid cells


def shape_referent(scene: Scene, s: Shape) -> str:
    """How a shape question names ``s`` (never by its kind)."""
    if len(scene.shapes) == 1:
        return "object"
    if _unique(scene, "colour", s.colour):
        return f"{s.colour} object"
    return f"object at the {s.position}"


def position_referent(scene: Scene, s: Shape, rng: random.Random) -> str:
    """How a position question names ``s``: colour + kind (distinct by construction), or one of them
    alone where it is unique."""
    options = [s.name]
    if _unique(scene, "kind", s.kind):
        options.append(s.kind)
    if _unique(scene, "colour", s.colour):
        options.append(f"{s.colour} shape")
    return rng.choice(options)


def qa_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Questions about a scene as ``(category, question, short answer, long answer)``.

    Every question has exactly one right answer: an object is named only by what singles it out in
    its scene (its kind, colour, colour + kind or grid cell; see the ``*_referent`` functions).
    """
    out = []
    n = len(scene.shapes)
    for s in scene.shapes:
        ref = colour_referent(scene, s)
        out.append(("colour", f"What colour is the {ref}?", s.colour, f"The {ref} is {s.colour}."))
        ref = shape_referent(scene, s)
        out.append(("shape", f"What shape is the {ref}?", s.kind, f"The {ref} is {_a(s.kind)}."))
        ref = position_referent(scene, s, rng)
        out.append(("position", f"Where is the {ref}?", s.position, f"The {ref} is at the {s.position}."))
    out.append(
        ("count", "How many shapes are in the image?", str(n), f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]}.")
    )
    present = rng.choice(scene.shapes)
    out.append(("yes_no", f"Is there {_a(present.name)} in the image?", "yes", f"Yes, there is {_a(present.name)}."))
    names = {s.name for s in scene.shapes}
    absent = rng.choice([f"{c} {k}" for k in SHAPES for c in COLOURS if f"{c} {k}" not in names])
    out.append(("yes_no", f"Is there {_a(absent)} in the image?", "no", f"No, there is no {absent}."))
    return out


def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shapes = list(scene.shapes)
    options = ["corners"]
    # Only ask "which is highest/leftmost" when exactly one shape holds that row/column.
    if len(shapes) > 1 and [s.row for s in shapes].count(min(s.row for s in shapes)) == 1:
        options.append("highest")
    if len(shapes) > 1 and [s.col for s in shapes].count(min(s.col for s in shapes)) == 1:
        options.append("leftmost")
    kind = rng.choice(options)
    if kind == "corners":
        total = sum(CORNERS[s.kind] for s in shapes)
        detail = ", ".join(f"the {s.name} has {CORNERS[s.kind]}" for s in shapes)
        return (
            "How many corners do the shapes in the image have in total? Explain.",
            f"Counting each shape: {detail}. In total there are {total} corners.",
        )
    if kind == "highest":
        top = min(shapes, key=lambda s: s.row)
        return (
            "Which shape is closest to the top of the image, and why?",
            f"The {top.name} is closest to the top: it is at the {top.position}, above the other shapes.",
        )
    left = min(shapes, key=lambda s: s.col)
    return (
        "Which shape is furthest to the left? Explain how you can tell.",
        f"The {left.name} is furthest to the left: it sits at the {left.position}, left of the other shapes.",
    )


def _with_image(text: str, rng: random.Random) -> str:
    """LLaVA's data puts <image> at the start or the end of the first human turn."""
    return f"<image>\n{text}" if rng.random() < 0.7 else f"{text}\n<image>"


def _turn(who: str, value: str) -> dict[str, str]:
    return {"from": who, "value": value}


def pretrain_record(idx: int, image: str, scene: Scene, rng: random.Random) -> dict:
    return {
        "id": f"pretrain-{idx:06d}",
        "image": image,
        "conversations": [
            _turn("human", _with_image(rng.choice(CAPTION_PROMPTS), rng)),
            _turn("gpt", caption(scene, rng)),
        ],
    }


# Half the instruct records are short-answer VQA, as in LLaVA-1.5's mix665k (VQAv2, GQA, ... asked
# with the SHORT prompt): without them a small model learns the long answers' wording but too few
# image-grounded answers to learn to see (measured: colour accuracy at chance after 1200 steps).
INSTRUCT_KINDS = ("vqa", "conversation", "vqa", "detail", "vqa", "reasoning")


def instruct_record(idx: int, image: str, scene: Scene, rng: random.Random) -> dict:
    kind = INSTRUCT_KINDS[idx % len(INSTRUCT_KINDS)]
    if kind == "vqa":
        pairs = qa_pairs(scene, rng)
        turns = []
        for i, (_, q, short, _) in enumerate(rng.sample(pairs, min(len(pairs), rng.randint(3, 5)))):
            question = f"{q}\n{SHORT}"
            turns += [_turn("human", _with_image(question, rng) if i == 0 else question), _turn("gpt", short)]
    elif kind == "conversation":
        pairs = qa_pairs(scene, rng)
        turns: list[dict[str, str]] = []
        for i, (_, q, short, long) in enumerate(rng.sample(pairs, min(len(pairs), rng.randint(1, 3)))):
            ask_short = rng.random() < 0.6
            question = f"{q}\n{SHORT}" if ask_short else q
            turns += [_turn("human", _with_image(question, rng) if i == 0 else question), _turn("gpt", short if ask_short else long)]
    elif kind == "detail":
        turns = [_turn("human", _with_image(rng.choice(DETAIL_PROMPTS), rng)), _turn("gpt", detailed_description(scene))]
    else:
        q, a = reasoning(scene, rng)
        turns = [_turn("human", _with_image(q, rng)), _turn("gpt", a)]
    return {"id": f"instruct-{idx:06d}", "image": image, "conversations": turns}


def eval_questions(idx: int, image: str, scene: Scene, rng: random.Random) -> list[tuple[dict, dict]]:
    """One question per category for a held-out scene: (model_vqa question, answer key row)."""
    by_cat: dict[str, list] = {}
    for cat, q, short, _ in qa_pairs(scene, rng):
        by_cat.setdefault(cat, []).append((q, short))
    out = []
    for cat in EVAL_CATEGORIES:
        q, answer = rng.choice(by_cat[cat])
        qid = f"{idx:05d}-{cat}"
        out.append(
            (
                {"question_id": qid, "image": image, "text": f"{q}\n{SHORT}", "category": cat},
                {"question_id": qid, "answer": answer, "category": cat},
            )
        )
    return out


def corpus(seed: int = 0, n_scenes: int = 400) -> Iterator[str]:
    """Text for training a tokenizer: everything the synthetic world says, plus varied sentences."""
    rng = random.Random(seed)
    yield from CAPTION_PROMPTS + DETAIL_PROMPTS + (SHORT,)
    for q, a in TEXT_ONLY:
        yield q
        yield a
    for _ in range(n_scenes):
        scene = random_scene(rng)
        yield caption(scene, rng)
        yield detailed_description(scene)
        for _, q, short, long in qa_pairs(scene, rng):
            yield f"{q} {short} {long}"
        yield " ".join(reasoning(scene, rng))
    yield from _VARIED_TEXT


_VARIED_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,"
    " detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: SYSTEM: Hello! How can I help you today? Thank you, that was useful.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.",
    "Please summarise the following paragraph in one sentence, keeping the key numbers: 12, 345 and 6789.",
    "Images, text and numbers: what does this photo show, and where was it taken?",
    "I am not sure I understand the question. Could you rephrase it or give me more details?",
    "Training a vision-language model aligns image features with word embeddings before tuning on instructions.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.",
    "The weather today is cloudy with a chance of rain in the evening; bring an umbrella.",
)


# ---------------------------------------------------------------------------------------------
# Writing a dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class SynthSummary:
    out: str
    train_images: int
    eval_images: int
    pretrain_records: int
    instruct_records: int
    eval_questions: int

    def as_dict(self) -> dict:
        return asdict(self)


def write_dataset(out: str | Path, n: int = 1000, seed: int = 0, n_eval: int | None = None,
                  text_only_fraction: float = 0.03, scale: int = 1, image_format: str = "png",
                  shape_counts: Sequence[int] = SHAPE_COUNTS) -> SynthSummary:
    """Write the synthetic world to ``out``: images, ``pretrain.json``, ``instruct.json``, ``eval/``.

    Args:
        out: destination directory (created).
        n: number of training scenes (one image each; one pretrain and one instruct record per image).
        seed: makes the output a pure function of the arguments.
        n_eval: held-out eval scenes (default ``max(20, n // 10)``), one question per category each.
        text_only_fraction: share of extra text-only instruct samples.
        scale: draw images ``scale`` times larger (4 gives COCO-like 512-640 px sides, for benchmarks).
        image_format: ``png`` (lossless, the default) or ``jpg`` (like COCO).
        shape_counts: shapes per scene, drawn uniformly from these (each 1-3; ``(1,)``: one shape
            per image, a world where no question needs to tell shapes apart).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError("image_format must be png or jpg")
    if n < 1:
        raise ValueError("n must be at least 1")
    if not shape_counts or not set(shape_counts) <= {1, 2, 3}:
        raise ValueError(f"shape_counts must be drawn from 1, 2 and 3, got {tuple(shape_counts)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, instruct, scenes, eval_scenes = [], [], [], []
    for i in range(n):
        scene = random_scene(rng, shape_counts)
        name = f"{i:06d}.{image_format}"
        save_image(render(scene, scale), out / "images" / name)
        scenes.append(scene_record(name, scene))
        pretrain.append(pretrain_record(i, name, scene, rng))
        instruct.append(instruct_record(i, name, scene, rng))
    for j in range(int(round(n * text_only_fraction))):
        q, a = TEXT_ONLY[j % len(TEXT_ONLY)]
        instruct.append({"id": f"text-{j:06d}", "conversations": [_turn("human", q), _turn("gpt", a)]})
    questions, answers = [], []
    n_eval = max(20, n // 10) if n_eval is None else n_eval
    for k in range(n_eval):
        scene = random_scene(rng, shape_counts)
        name = f"eval_{k:05d}.{image_format}"
        save_image(render(scene, scale), out / "eval" / "images" / name)
        eval_scenes.append(scene_record(name, scene))
        for q, a in eval_questions(k, name, scene, rng):
            questions.append(q)
            answers.append(a)
    (out / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (out / "instruct.json").write_text(json.dumps(instruct, indent=1))
    for path, rows in ((out / "scenes.jsonl", scenes), (out / "eval" / "scenes.jsonl", eval_scenes),
                       (out / "eval" / "questions.jsonl", questions), (out / "eval" / "answers_key.jsonl", answers)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SynthSummary(str(out), n, n_eval, len(pretrain), len(instruct), len(questions))

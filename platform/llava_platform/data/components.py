"""Stage 0's data: the synthetic world as training rows for the pretrained parts (Ray Data).

- Vision tower rows: the image at the tower's size (squared like LLaVA's ``pad``), its caption's tokens
  for the contrastive loss, and per patch the class of what its grid cell holds (0 empty, else kind x
  colour) for the dense objective, all from ``scenes.jsonl`` and ``pretrain.json``.
- Language model rows: the world's text (captions, answers, the text-only records) in LLaVA's two
  formats, each image replaced by what it shows in words (:func:`scene_text`), with next-token labels.

Neither imports the model package: the tokenizer comes in as an object.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from llava_platform.config.components import VisionTowerSpec
from llava_platform.config.schema import STAGE_TEMPLATES
from llava_platform.data.conversation import IMAGE_PLACEHOLDER, chat_ids, chat_template, llava_turns_to_messages
from llava_platform.data.images import CLIP_MEAN, CLIP_STD, expand_to_square, normalize, pad_colour
from llava_platform.data.scenes import COLOURS, SHAPES


def read_world(world: str) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """``(scenes by image name, pretrain records, instruct records)`` of a synthetic world directory.

    Raises:
        FileNotFoundError: not a world written by ``llava-platform data synth``.
    """
    missing = [f for f in ("scenes.jsonl", "pretrain.json", "instruct.json") if not os.path.exists(os.path.join(world, f))]
    if missing:
        raise FileNotFoundError(f"{world} is not a synthetic world (no {', '.join(missing)}); write one with"
                                " `llava-platform data synth --out DIR`")
    with open(os.path.join(world, "scenes.jsonl")) as f:
        scenes = {r["image"]: r for r in map(json.loads, f)}
    with open(os.path.join(world, "pretrain.json")) as f:
        pretrain = json.load(f)
    with open(os.path.join(world, "instruct.json")) as f:
        instruct = json.load(f)
    return scenes, pretrain, instruct


# ---------------------------------------------------------------------------------------------
# Vision tower rows
# ---------------------------------------------------------------------------------------------


def cell_targets(scene: dict, spec: VisionTowerSpec) -> list[int]:
    """Per patch (row-major) the class of the shape whose centre lies in it after the image is padded
    to a square and resized to the tower's size: ``1 + kind * len(COLOURS) + colour``, 0 when empty."""
    side = max(scene["width"], scene["height"])
    ox, oy = (side - scene["width"]) // 2, (side - scene["height"]) // 2
    grid = spec.image_size // spec.patch_size
    scale = spec.image_size / side
    out = [0] * grid * grid
    for s in scene["shapes"]:
        x, y = (s["center"][0] + ox) * scale, (s["center"][1] + oy) * scale
        col, row = min(grid - 1, int(x // spec.patch_size)), min(grid - 1, int(y // spec.patch_size))
        out[row * grid + col] = 1 + SHAPES.index(s["kind"]) * len(COLOURS) + list(COLOURS).index(s["colour"])
    return out


class VisionRows:
    """Ray Data ``map_batches`` function: world items -> vision tower rows (tokenizer loaded once)."""

    def __init__(self, world: str, spec: VisionTowerSpec, tokenizer: Any):
        self.world, self.spec, self.tokenizer = world, spec, tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from PIL import Image

        out: dict[str, list] = {"id": [], "image": [], "caption_ids": [], "cells": []}
        fill = pad_colour(CLIP_MEAN)
        for name, scene_json, caption in zip(batch["image"], batch["scene"], batch["caption"]):
            scene = json.loads(scene_json)
            with Image.open(os.path.join(self.world, "images", str(name))) as img:
                square = expand_to_square(img.convert("RGB"), fill)
                pixels = np.asarray(square.resize((self.spec.image_size,) * 2, Image.Resampling.BICUBIC), np.uint8)
            ids = self.tokenizer(str(caption), add_special_tokens=False)["input_ids"][: self.spec.max_caption_tokens - 1]
            out["id"].append(str(name))
            out["image"].append(pixels.tobytes())
            out["caption_ids"].append(ids + [self.tokenizer.eos_token_id])
            out["cells"].append(cell_targets(scene, self.spec))
        return out


def vision_items(world: str) -> list[dict[str, str]]:
    """One item per training image: its scene and one caption (from ``pretrain.json``)."""
    scenes, pretrain, _ = read_world(world)
    captions = {r["image"]: r["conversations"][-1]["value"] for r in pretrain if r.get("image")}
    return [{"image": name, "scene": json.dumps(scene), "caption": captions[name]}
            for name, scene in scenes.items() if name in captions]


def vision_dataset(world: str, spec: VisionTowerSpec, tokenizer: Any, num_cpus: float = 0.5):
    """The vision tower's training rows as a Ray Dataset."""
    import ray.data

    items = vision_items(world)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(32, len(items) // 256)))
    return ds.map_batches(VisionRows, fn_constructor_kwargs={"world": world, "spec": spec, "tokenizer": tokenizer},
                          batch_size=256, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, batch_format="numpy")


def collate_vision_rows(rows: Sequence[dict[str, Any]], spec: VisionTowerSpec) -> dict[str, torch.Tensor]:
    """Rows -> ``pixel_values`` (CLIP-normalised), caption ``input_ids``/``attention_mask``, ``cell_targets``."""
    size = spec.image_size
    images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(size, size, 3) for r in rows])
    longest = max(len(r["caption_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        caption = torch.as_tensor(np.asarray(r["caption_ids"]), dtype=torch.long)
        ids[i, : len(caption)] = caption
        mask[i, : len(caption)] = 1
    return {"pixel_values": normalize(images, CLIP_MEAN, CLIP_STD), "input_ids": ids, "attention_mask": mask,
            "cell_targets": torch.as_tensor(np.stack([np.asarray(r["cells"]) for r in rows]), dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# Language model rows
# ---------------------------------------------------------------------------------------------


def scene_text(scene: dict) -> str:
    """What an image shows, in words, shapes in reading order: ``"In the picture: a small red triangle
    at the top left and a large blue star at the center."``"""
    from llava_platform.data.synthetic import _a, _list_phrase

    shapes = sorted(scene["shapes"], key=lambda s: (s["row"], s["col"]))
    parts = [f"{_a(s['size'] + ' ' + s['colour'] + ' ' + s['kind'])} at the {s['position']}" for s in shapes]
    return f"In the picture: {_list_phrase(parts)}."


def language_documents(world: str) -> list[dict[str, Any]]:
    """The world's text as LLaVA records with each image replaced by :func:`scene_text`:
    ``{"id", "template", "messages"}``; stage 1's captions in ``plain``, stage 2's conversations (and
    the text-only records) in stage 2's template (``vicuna_v1``), as LLaVA-1.5 trains them."""
    scenes, pretrain, instruct = read_world(world)
    docs = []
    for template, records in ((STAGE_TEMPLATES["pretrain"], pretrain), (STAGE_TEMPLATES["finetune"], instruct)):
        for r in records:
            image = r.get("image")
            messages = llava_turns_to_messages(r["conversations"], bool(image))
            if image:
                text = scene_text(scenes[image])
                for m in messages:
                    m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, text)
            docs.append({"id": f"text-{r['id']}", "template": template, "messages": messages})
    return docs


def encode_document(doc: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """A document's tokens with next-token labels on all of it (a language model's pretraining): the
    ``plain`` layout keeps the human text here, since it stands for the image."""
    if doc["template"] == "plain":
        text = "".join(m["content"] for m in doc["messages"] if m["role"] == "user")
        caption = "".join(m["content"] for m in doc["messages"] if m["role"] == "assistant")
        ids = [tokenizer.bos_token_id] + tokenizer(text + caption + "\n", add_special_tokens=False)["input_ids"]
    else:
        ids, _ = chat_ids(tokenizer, doc["messages"], chat_template(doc["template"]), with_mask=False)
    ids = ids[:max_length]
    # has_image (always False) lets the trainer's length grouping (group_by_modality_length) batch these rows.
    return {"id": doc["id"], "input_ids": ids, "labels": ids, "length": len(ids), "has_image": False}


class LanguageRows:
    """Ray Data ``map_batches`` function: documents -> token rows."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [encode_document(json.loads(d), self.tokenizer, self.max_length) for d in batch["doc"]]
        return {k: [r[k] for r in rows] for k in ("id", "input_ids", "labels", "length", "has_image")}


def language_dataset(world: str, tokenizer: Any, max_length: int = 512, num_cpus: float = 0.5, seed: int = 0):
    """The language model's training rows as a Ray Dataset (documents shuffled once, by seed)."""
    import random

    import ray.data

    docs = language_documents(world)
    random.Random(seed).shuffle(docs)
    ds = ray.data.from_items([{"doc": json.dumps(d)} for d in docs], override_num_blocks=max(1, min(32, len(docs) // 256)))
    return ds.map_batches(LanguageRows, fn_constructor_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                          batch_size=256, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, batch_format="numpy")


def world_corpus(world: str) -> Iterable[str]:
    """Text to train the language model's tokenizer on: every document, plus varied sentences."""
    from llava_platform.data.synthetic import corpus

    for doc in language_documents(world):
        for m in doc["messages"]:
            yield m["content"]
    yield from corpus(seed=0, n_scenes=50)


def collate_token_rows(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token rows -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        x = torch.as_tensor(np.asarray(r["input_ids"]), dtype=torch.long)
        ids[i, : len(x)] = x
        labels[i, : len(x)] = torch.as_tensor(np.asarray(r["labels"]), dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

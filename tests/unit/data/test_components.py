import json

import numpy as np
import pytest
import torch

from llava_platform.config.components import VisionTowerSpec
from llava_platform.data.components import (
    CLIP_MEAN,
    VisionRows,
    cell_targets,
    collate_token_rows,
    collate_vision_rows,
    encode_document,
    language_documents,
    read_world,
    scene_text,
    vision_items,
    world_corpus,
)
from llava_platform.data.scenes import COLOURS, SHAPES

SPEC = VisionTowerSpec()  # 96 px, patches of 32: a 3x3 grid, one patch per cell of the world


def test_read_world_names_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenes.jsonl.*data synth"):
        read_world(str(tmp_path))


def test_cell_targets_put_each_shape_in_its_grid_cell(synth_dir):
    scenes, _, _ = read_world(str(synth_dir))
    for scene in scenes.values():
        cells = cell_targets(scene, SPEC)
        assert len(cells) == 9 and sum(c > 0 for c in cells) == len(scene["shapes"])
        for s in scene["shapes"]:
            cls = cells[s["row"] * 3 + s["col"]]
            assert cls == 1 + SHAPES.index(s["kind"]) * len(COLOURS) + list(COLOURS).index(s["colour"])


def test_vision_rows_pad_resize_and_tokenise(synth_dir, tiny_tokenizer):
    items = vision_items(str(synth_dir))
    assert len(items) == 40
    batch = {k: np.array([it[k] for it in items[:3]], dtype=object) for k in ("image", "scene", "caption")}
    rows = VisionRows(str(synth_dir), SPEC, tiny_tokenizer)(batch)
    assert [len(b) for b in rows["image"]] == [96 * 96 * 3] * 3
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in rows["caption_ids"])
    out = collate_vision_rows([{k: rows[k][i] for k in rows} for i in range(3)], SPEC)
    assert out["pixel_values"].shape == (3, 3, 96, 96) and out["cell_targets"].shape == (3, 9)
    assert out["attention_mask"].sum(1).tolist() == [len(ids) for ids in rows["caption_ids"]]
    # the square padding is the mean colour, i.e. ~0 after normalisation
    scene = json.loads(items[0]["scene"])
    if scene["width"] != scene["height"]:
        corner = out["pixel_values"][0, :, 0, 0] if scene["width"] > scene["height"] else out["pixel_values"][0, :, 0, 0]
        assert corner.abs().max() < 0.05, (corner, CLIP_MEAN)


def test_scene_text_names_every_shape_with_its_place(synth_dir):
    scenes, _, _ = read_world(str(synth_dir))
    for scene in scenes.values():
        text = scene_text(scene)
        for s in scene["shapes"]:
            assert f"{s['colour']} {s['kind']} at the {s['position']}" in text


def test_language_documents_replace_the_image_by_its_description(synth_dir, tiny_tokenizer):
    docs = language_documents(str(synth_dir))
    _, pretrain, instruct = read_world(str(synth_dir))
    assert len(docs) == len(pretrain) + len(instruct)
    assert not any("<image>" in m["content"] for d in docs for m in d["messages"])
    assert {d["template"] for d in docs} == {"plain", "vicuna_v1"}
    row = encode_document(docs[0], tiny_tokenizer, max_length=512)
    assert row["input_ids"] == row["labels"] and row["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert "In the picture:" in tiny_tokenizer.decode(row["input_ids"])
    assert len(encode_document(docs[-1], tiny_tokenizer, max_length=7)["input_ids"]) == 7
    assert any("In the picture" in t for t in world_corpus(str(synth_dir)))


def test_language_rows_batch_by_length_like_llava_stage_2(synth_dir, tiny_tokenizer):
    from llava_platform.data.batching import length_grouped_batches

    rows = [encode_document(d, tiny_tokenizer, max_length=512) for d in language_documents(str(synth_dir))]
    batches = list(length_grouped_batches(rows, 4, group_batches=len(rows)))
    assert sorted(r["id"] for b in batches for r in b) == sorted(r["id"] for r in rows)
    # Sorted by length within the buffer: a batch pads to little more than its own rows.
    spread = [max(r["length"] for r in b) - min(r["length"] for r in b) for b in batches[:-1]]
    lengths = [r["length"] for r in rows]
    assert max(spread) < max(lengths) - min(lengths), spread


def test_collate_token_rows_pads_right_and_masks_labels():
    out = collate_token_rows([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].dtype == torch.long and out["attention_mask"].sum() == 4

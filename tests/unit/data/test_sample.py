import json

import numpy as np
import torch

from llava_platform.data.conversation import IGNORE_INDEX
from llava_platform.data.sample import LlavaCollator, SampleSpec, encode_record
from llava_platform.model.presets import build_preset


def _samples(synth_dir, processor, spec, fname, n):
    recs = json.loads((synth_dir / fname).read_text())
    text_only = [r for r in recs if not r.get("image")][:1]
    chosen = recs[:n] + text_only
    return [encode_record(r, (synth_dir / "images" / r["image"]).read_bytes() if r.get("image") else None,
                          processor.tokenizer, spec) for r in chosen]


def test_encode_record_fields(synth_dir):
    model, processor = build_preset("tiny")
    spec = SampleSpec.from_processor(processor, model.config, "llava_v1", max_length=256)
    assert spec.num_image_tokens == 16 and spec.image_size == 32
    s = _samples(synth_dir, processor, spec, "instruct.json", 1)[0]
    assert s["has_image"] and s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
    assert s["length"] == len(s["input_ids"]) == len(s["labels"])
    assert s["input_ids"].count(model.config.image_token_id) == 16


def test_collate_pads_and_stacks_only_present_images(synth_dir):
    model, processor = build_preset("tiny")
    spec = SampleSpec.from_processor(processor, model.config, "llava_v1", max_length=256)
    samples = _samples(synth_dir, processor, spec, "instruct.json", 3)
    assert [s["has_image"] for s in samples] == [True, True, True, False]
    ip = processor.image_processor
    batch = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std)(samples)
    longest = max(s["length"] for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, longest)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for i, s in enumerate(samples):
        k = s["length"]
        assert batch["attention_mask"][i].sum() == k
        assert (batch["input_ids"][i, k:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_collate_text_only_batch_has_no_pixels(synth_dir):
    model, processor = build_preset("tiny")
    spec = SampleSpec.from_processor(processor, model.config, "llava_v1", max_length=256)
    samples = _samples(synth_dir, processor, spec, "instruct.json", 0)
    ip = processor.image_processor
    batch = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std)(samples)
    assert "pixel_values" not in batch
    assert torch.isfinite(model(**batch).loss)


def test_collated_pixels_equal_processor_pixels(synth_dir):
    """The uint8 path + on-the-fly normalisation gives what LlavaProcessor gives for the padded image."""
    from PIL import Image

    model, processor = build_preset("tiny")
    spec = SampleSpec.from_processor(processor, model.config, "plain", max_length=256)
    rec = json.loads((synth_dir / "pretrain.json").read_text())[0]
    s = encode_record(rec, (synth_dir / "images" / rec["image"]).read_bytes(), processor.tokenizer, spec)
    ip = processor.image_processor
    ours = LlavaCollator(0, ip.image_mean, ip.image_std)([s])["pixel_values"]
    ref = ip(Image.fromarray(s["image"]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

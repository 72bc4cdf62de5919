"""llava-hf's checkpoint layout for every export, sharded or not."""

from __future__ import annotations

import json

import torch

from llava_platform.model.builder import save_model
from llava_platform.model.presets import build_preset
from llava_platform.model.layouts import LLAVA_HF_PREFIXES, to_llava_hf_layout


def test_exports_use_llava_hf_weight_names_in_every_shard(tmp_path):
    # llava-hf/llava-1.5-7b-hf (what vLLM and SGLang map by name): vision_tower.vision_model.*,
    # multi_modal_projector.*, language_model.model.*, language_model.lm_head.*, and a
    # preprocessor_config.json. Measured before: the tower was saved as vision_tower.embeddings...
    from safetensors import safe_open
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model, processor = build_preset("tiny", seed=3)
    save_model(model, processor, str(tmp_path / "one"))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    processor.save_pretrained(sharded)
    to_llava_hf_layout(str(sharded))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    for path in (tmp_path / "one", sharded):
        keys = set()
        for shard in path.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                keys |= set(f.keys())
        assert keys and all(k.startswith(LLAVA_HF_PREFIXES) for k in keys), sorted(keys)[:5]
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
        assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
        reloaded = LlavaForConditionalGeneration.from_pretrained(path).state_dict()
        original = model.state_dict()
        assert reloaded.keys() == original.keys() and all(torch.equal(reloaded[k], original[k]) for k in original)
        assert AutoImageProcessor.from_pretrained(path).crop_size["height"] == model.config.vision_config.image_size
    assert set(index) == keys

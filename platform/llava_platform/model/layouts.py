"""llava-hf's checkpoint layout: what our exports are, and what transformers, vLLM and SGLang load
(``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``). The original LLaVA code's layout is :mod:`llava_platform.model.original`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from llava_platform.errors import ModelBuildError

#: Weight-name prefixes of llava-hf checkpoints (``llava-hf/llava-1.5-7b-hf``), which vLLM and SGLang
#: map by name: ``save_pretrained`` in transformers 5 writes the others already, but the CLIP tower
#: without its ``vision_model.`` level.
LLAVA_HF_PREFIXES = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                     "language_model.lm_head.")


def rename_shards(path: str, renamed: Callable[[str], str]) -> None:
    """Rename the weights in every safetensors shard of a directory (and its index)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(path)
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {renamed(k): f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {"format": "pt"}
        tmp = shard.with_name(shard.name + ".tmp")  # the tensors may map the old file: write beside, then swap
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, shard)
    index = root / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def with_vision_model_level(key: str, prefix: str = "") -> str:
    """``<prefix>X`` -> ``<prefix>vision_model.X`` (CLIP's hub layout), unless it is there already."""
    rest = key[len(prefix):]
    return key if rest.startswith("vision_model.") else prefix + "vision_model." + rest


def to_llava_hf_layout(path: str) -> None:
    """Rewrite a local ``save_pretrained`` LLaVA directory in llava-hf's layout: tower weights as
    ``vision_tower.vision_model.*`` (in every shard and the shard index), and the image processor's
    own ``preprocessor_config.json`` beside ``processor_config.json`` for loaders that read only it.
    transformers loads both layouts to the same tensors.

    Raises:
        ModelBuildError: a weight name fits none of llava-hf's prefixes.
    """
    def renamed(key: str) -> str:
        if key.startswith("vision_tower."):
            key = with_vision_model_level(key, "vision_tower.")
        if not key.startswith(LLAVA_HF_PREFIXES):
            raise ModelBuildError(f"internal: weight {key!r} has no place in the llava-hf layout")
        return key

    rename_shards(path, renamed)
    root = Path(path)
    processor_config = root / "processor_config.json"
    if processor_config.exists():
        image_processor = json.loads(processor_config.read_text()).get("image_processor")
        if image_processor is not None:
            (root / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The original LLaVA layout
# ---------------------------------------------------------------------------------------------

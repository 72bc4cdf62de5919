"""The original LLaVA code's checkpoint layout (haotian-liu/LLaVA's ``LlavaLlamaForCausalLM``), in
and out: imported into, and exported from, llava-hf's (:mod:`llava_platform.model.layouts`).

The original layout is a Llama checkpoint (``model.embed_tokens``, ``model.layers.*``,
``model.norm``, ``lm_head``) plus the projector as ``model.mm_projector.*`` and ``mm_*`` fields in
``config.json``; the vision tower is not inside but named by ``mm_vision_tower`` (a hub id or path),
unless it was trained (``model.vision_tower.vision_tower.*``). Stage 1 writes the projector alone
(``mm_projector.bin``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llava_platform.errors import ModelBuildError
from llava_platform.model.layouts import rename_shards, with_vision_model_level

ORIGINAL_PROJECTOR = "model.mm_projector."
ORIGINAL_TOWER = "model.vision_tower.vision_tower."
#: ``config.json`` fields of the original layout that a plain Llama config does not have.
ORIGINAL_MM_FIELDS = ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
                      "mm_vision_select_feature", "image_aspect_ratio", "mm_use_im_start_end",
                      "mm_use_im_patch_token", "mm_patch_merge_type", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                      "use_mm_proj", "mm_projector_lr", "mm_vision_tower_lr", "image_grid_pinpoints",
                      "tokenizer_padding_side", "tokenizer_model_max_length", "unfreeze_mm_vision_tower")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")



def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, or of a directory's weight shards (``model*.safetensors``,
    else ``pytorch_model*.bin``; not the ``training_args.bin`` or ``mm_projector.bin`` beside them)."""
    from safetensors.torch import load_file

    files = ([path] if path.is_file() else
             sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin")))
    if not files:
        raise ModelBuildError(f"no weights (model*.safetensors, pytorch_model*.bin) in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    return out


def _projector_state(weights: dict[str, torch.Tensor], projector_type: str) -> dict[str, torch.Tensor]:
    """Original ``mm_projector`` weights as HF's two-layer projector (``linear``: the one layer as
    ``linear_1``, ``linear_2`` the identity)."""
    p = {k[len(ORIGINAL_PROJECTOR):]: v for k, v in weights.items() if k.startswith(ORIGINAL_PROJECTOR)}
    if projector_type == "mlp2x_gelu":
        names = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                 "2.bias": "linear_2.bias"}
    elif projector_type == "linear":
        names = {"weight": "linear_1.weight", "bias": "linear_1.bias"}
    else:
        raise ModelBuildError(f"mm_projector_type {projector_type!r} is not supported (linear, mlp2x_gelu)")
    if set(p) != set(names):
        raise ModelBuildError(f"the {projector_type} projector needs model.mm_projector.{{{', '.join(sorted(names))}}}; "
                              f"found {sorted(p) or 'none'}")
    state = {names[k]: v for k, v in p.items()}
    if projector_type == "linear":
        out = state["linear_1.weight"].shape[0]
        state.update({"linear_2.weight": torch.eye(out, dtype=state["linear_1.weight"].dtype),
                      "linear_2.bias": torch.zeros(out, dtype=state["linear_1.weight"].dtype)})
    return state


def _original_options(config: dict[str, Any], vision_tower: str | None) -> dict[str, Any]:
    """ModelSpec fields from an original ``config.json`` (``vision_tower`` overrides ``mm_vision_tower``).

    Raises:
        ModelBuildError: a setting this platform cannot reproduce, or no vision tower named.
    """
    tower = vision_tower or config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        raise ModelBuildError("the checkpoint names no vision tower (mm_vision_tower); pass --vision-tower")
    if config.get("mm_use_im_start_end"):
        raise ModelBuildError("mm_use_im_start_end=True checkpoints (image start/end tokens) are not supported")
    if config.get("mm_patch_merge_type", "flat") != "flat" or config.get("image_aspect_ratio") == "anyres":
        raise ModelBuildError("LLaVA-NeXT's anyres / spatial patch merging is not supported (LLaVA-1.5 only)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ModelBuildError(f"mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")
    return {"vision_tower": tower, "projector_type": config.get("mm_projector_type", "linear"),
            "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
            "vision_feature_select_strategy": "default" if feature == "patch" else "full"}


def import_original(src: str, vision_tower: str | None = None, storage_config: Any = None,
                    dtype: str = "float32") -> tuple[Any, Any]:
    """A LLaVA model (and processor) from an original-layout checkpoint: the Llama part and its
    tokenizer from the checkpoint, the tower from ``mm_vision_tower`` (hub id, path or ``s3://``;
    ``vision_tower`` overrides it), the projector (and a trained tower) from its weights.

    Raises:
        ModelBuildError: not an original-layout checkpoint, or a setting that is not supported.
    """
    from llava_platform.config.schema import ModelSpec
    from llava_platform.model.builder import compose
    from llava_platform.tracking.models import resolve_model_uri

    root = Path(resolve_model_uri(src, storage_config))
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelBuildError(f"{src} has no readable config.json: {e}") from e
    if config.get("model_type") not in ("llava_llama", "llava", None) and "llama" not in str(config.get("architectures")).lower():
        raise ModelBuildError(f"{src} is a {config.get('model_type')!r} checkpoint; only LLaVA's Llama models "
                              "(LlavaLlamaForCausalLM) import")
    options = _original_options(config, vision_tower)
    weights = _read_weights(root)
    if not any(k.startswith(ORIGINAL_PROJECTOR) for k in weights):
        raise ModelBuildError(f"{src} has no model.mm_projector.* weights: not an original LLaVA checkpoint")
    projector = _projector_state(weights, options["projector_type"])
    tower_state = {k[len(ORIGINAL_TOWER):]: v for k, v in weights.items() if k.startswith(ORIGINAL_TOWER)}
    llm_state = {k: v for k, v in weights.items()
                 if not k.startswith((ORIGINAL_PROJECTOR, ORIGINAL_TOWER, "model.vision_tower."))}
    with tempfile.TemporaryDirectory() as tmp:
        llm_config = {k: v for k, v in config.items() if k not in ORIGINAL_MM_FIELDS and k != "vision_tower"}
        llm_config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (Path(tmp) / "config.json").write_text(json.dumps(llm_config))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in llm_state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        for name in _TOKENIZER_FILES:
            if (root / name).exists():
                shutil.copy(root / name, Path(tmp) / name)
        model, processor = compose(ModelSpec(llm=tmp, dtype=dtype, **options), storage_config)
    load_projector(model, projector)
    if tower_state:  # a tower trained in stage 2 (unfreeze_mm_vision_tower) travels inside
        tower = model.model.vision_tower
        own = set(tower.state_dict())
        state = {k if k in own else k.removeprefix("vision_model."): v for k, v in tower_state.items()
                 if not k.endswith("position_ids")}  # a buffer older transformers saved
        missing, unexpected = tower.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if unexpected or missing:
            raise ModelBuildError(f"the checkpoint's vision tower weights do not fit its mm_vision_tower: "
                                  f"unexpected {unexpected[:3]}, missing {missing[:3]}")
    return model, processor


def load_projector(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Put HF-named projector weights (``linear_1.*``, ``linear_2.*``) into a LLaVA model.

    Raises:
        ModelBuildError: their shapes do not fit the model's projector.
    """
    projector = model.model.multi_modal_projector
    ref = next(projector.parameters())
    try:
        projector.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ModelBuildError(f"the projector weights do not fit this vision tower and LLM: {e}") from e


def import_projector(projector_file: str, vision_tower: str, llm: str, projector_type: str = "mlp2x_gelu",
                     vision_feature_layer: int = -2, storage_config: Any = None, dtype: str = "float32") -> tuple[Any, Any]:
    """A LLaVA model composed from a tower, an LLM and stage 1's ``mm_projector.bin`` (the projector
    alone, as LLaVA's pretrain.sh writes it).

    Raises:
        ModelBuildError: the file holds no projector, or it does not fit the parts.
    """
    from llava_platform import storage
    from llava_platform.config.schema import ModelSpec
    from llava_platform.model.builder import compose

    if storage.is_remote(projector_file):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(projector_file).name
            local.write_bytes(storage.read_bytes(projector_file, storage_config))
            state = _projector_state(_read_weights(local), projector_type)
    else:
        state = _projector_state(_read_weights(Path(storage.strip_scheme(projector_file))), projector_type)
    model, processor = compose(ModelSpec(vision_tower=vision_tower, llm=llm, projector_type=projector_type,
                                         vision_feature_layer=vision_feature_layer, dtype=dtype), storage_config)
    load_projector(model, state)
    return model, processor


def export_original(model: Any, processor: Any, out: str, vision_tower: str | None = None,
                    image_aspect_ratio: str = "pad", model_max_length: int = 2048,
                    tokenizer_source: str | None = None) -> str:
    """Write a LLaVA model in the original layout to the local directory ``out``: Llama weights,
    ``model.mm_projector.*`` (a ``linear`` projector as its one equivalent layer), the mm_* config
    (``image_aspect_ratio`` and ``model_max_length`` as trained: LLaVA-1.5's by default), the
    tokenizer (with the SentencePiece ``tokenizer.model`` copied from ``tokenizer_source`` where it
    has one: LLaVA loads tokenizers with ``use_fast=False``); the tower goes to ``out/vision_tower``
    in CLIP's hub layout, and ``mm_vision_tower`` names that folder's absolute path, or
    ``vision_tower`` when given: the tower's source (e.g. its hub id), which LLaVA then loads in its
    place, so name it only for a tower that did not train.

    Raises:
        ModelBuildError: the model's settings have no original-layout equivalent.
    """
    from safetensors.torch import save_file

    cfg = model.config
    act = cfg.projector_hidden_act
    if act not in ("gelu", "linear"):
        raise ModelBuildError(f"projector activation {act!r} has no original LLaVA equivalent (gelu, linear)")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ModelBuildError("several vision feature layers have no original LLaVA equivalent")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lm = model.model.language_model
    weights = {f"model.{k}": v for k, v in lm.state_dict().items()}
    weights["lm_head.weight"] = model.lm_head.weight
    proj = model.model.multi_modal_projector
    if act == "gelu":
        weights.update({f"{ORIGINAL_PROJECTOR}0.weight": proj.linear_1.weight, f"{ORIGINAL_PROJECTOR}0.bias": proj.linear_1.bias,
                        f"{ORIGINAL_PROJECTOR}2.weight": proj.linear_2.weight, f"{ORIGINAL_PROJECTOR}2.bias": proj.linear_2.bias})
    else:  # two linear maps with the identity between them are one: W2 W1 x + (W2 b1 + b2)
        with torch.no_grad():
            w = proj.linear_2.weight.float() @ proj.linear_1.weight.float()
            b = proj.linear_2.weight.float() @ proj.linear_1.bias.float() + proj.linear_2.bias.float()
        dtype = proj.linear_1.weight.dtype
        weights.update({f"{ORIGINAL_PROJECTOR}weight": w.to(dtype), f"{ORIGINAL_PROJECTOR}bias": b.to(dtype)})
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    tower_dir = root / "vision_tower"
    model.model.vision_tower.save_pretrained(tower_dir)
    processor.image_processor.save_pretrained(tower_dir)
    rename_shards(str(tower_dir), with_vision_model_level)
    text = cfg.text_config.to_dict()
    text.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                mm_vision_tower=vision_tower or str(tower_dir.resolve()), mm_hidden_size=cfg.vision_config.hidden_size,
                mm_projector_type="mlp2x_gelu" if act == "gelu" else "linear",
                mm_vision_select_layer=cfg.vision_feature_layer,
                mm_vision_select_feature="patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
                image_aspect_ratio=image_aspect_ratio, mm_use_im_start_end=False, mm_use_im_patch_token=False,
                mm_patch_merge_type="flat", use_mm_proj=True, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
                tokenizer_padding_side="right", tokenizer_model_max_length=model_max_length, use_cache=True)
    rope = text.pop("rope_parameters", None) or {}  # transformers 5's form; LLaVA's (4.3x) reads these two
    text["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    text.pop("dtype", None)
    text["torch_dtype"] = str(next(lm.parameters()).dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    processor.tokenizer.save_pretrained(root)
    if tokenizer_source and (Path(tokenizer_source) / "tokenizer.model").exists():
        shutil.copy(Path(tokenizer_source) / "tokenizer.model", root / "tokenizer.model")
    return str(root)

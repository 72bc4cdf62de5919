"""Build, load and save a LLaVA model (HF ``LlavaForConditionalGeneration``) and its ``LlavaProcessor``.

Three sources, one assembly path (:func:`llava_platform.model.assembly.assemble`):

- :func:`compose`: a CLIP vision tower + a causal LM (llama family) + a new projector. This is how
  ``openai/clip-vit-large-patch14-336`` + ``lmsys/vicuna-7b-v1.5`` become LLaVA-1.5 before stage 1.
- :func:`load_checkpoint`: an existing LLaVA checkpoint in HF format (``llava-hf/llava-1.5-7b-hf`` or an
  export of this platform), from a local path or ``s3://``.
- :func:`llava_platform.model.presets.build_preset`: ``tiny`` / ``small`` models built from config
  (random init) with a tokenizer trained locally; tests use them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)

from llava_platform import storage
from llava_platform.config.schema import ModelSpec, StorageConfig
from llava_platform.data.images import num_image_tokens
from llava_platform.errors import ModelBuildError
from llava_platform.model.assembly import COMPONENTS, assemble, component_of
from llava_platform.model.components import default_image_processor
from llava_platform.model.layouts import to_llava_hf_layout
from llava_platform.model.presets import build_preset
from llava_platform.tracking.models import resolve_model_uri

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(spec: ModelSpec, storage_config: StorageConfig | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build or load the model described by ``spec``.

    Raises:
        ModelBuildError: the source cannot be loaded or its parts do not fit together.
    """
    if spec.preset is not None:
        return build_preset(spec.preset, seed=spec.seed, projector_type=spec.projector_type,
                            vision_feature_layer=spec.vision_feature_layer,
                            vision_feature_select_strategy=spec.vision_feature_select_strategy)
    if spec.checkpoint is not None:
        return load_checkpoint(spec.checkpoint, storage_config, dtype=spec.dtype, attn_implementation=spec.attn_implementation)
    return compose(spec, storage_config)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def compose(spec: ModelSpec, storage_config: StorageConfig | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A new LLaVA from a CLIP vision tower and a causal LM, each a hub id, local path or s3:// URI.

    Raises:
        ModelBuildError: a component cannot be loaded or does not fit.
    """
    assert spec.vision_tower is not None and spec.llm is not None  # guaranteed by ModelSpec
    dtype = _DTYPES[spec.dtype]
    vision_src = resolve_model_uri(spec.vision_tower, storage_config)
    llm_src = resolve_model_uri(spec.llm, storage_config)
    tok_src = resolve_model_uri(spec.tokenizer, storage_config) if spec.tokenizer else llm_src
    try:
        vision = CLIPVisionModel.from_pretrained(vision_src, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelBuildError(f"cannot load a CLIP vision tower from {spec.vision_tower!r}: {e}") from e
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(vision_src)
    except OSError:
        log.warning("no preprocessor config beside %s; using CLIP's defaults", spec.vision_tower)
        image_processor = default_image_processor(vision.config.image_size)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        llm = AutoModelForCausalLM.from_pretrained(llm_src, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelBuildError(f"cannot load a causal language model from {spec.llm!r}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as e:
        raise ModelBuildError(f"cannot load a tokenizer from {spec.tokenizer or spec.llm!r}: {e}") from e
    torch.manual_seed(spec.seed)
    return assemble(vision, llm, tokenizer, image_processor, spec)


def load_checkpoint(
    uri: str,
    storage_config: StorageConfig | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a LLaVA checkpoint in HF format (llava-hf, or an export of this platform).

    Raises:
        ModelBuildError: nothing loadable at ``uri``.
    """
    src = resolve_model_uri(uri, storage_config)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = LlavaForConditionalGeneration.from_pretrained(src, **kwargs)
        processor = AutoProcessor.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ModelBuildError(f"cannot load a LLaVA checkpoint from {uri!r}: {e}") from e
    if not isinstance(processor, LlavaProcessor):
        raise ModelBuildError(f"{uri!r} holds a {type(processor).__name__}, not a LlavaProcessor")
    if processor.tokenizer.eos_token is None:
        raise ModelBuildError(f"the tokenizer in {uri!r} has no end-of-sequence token")
    return model, processor


def load_processor(spec: ModelSpec, storage_config: StorageConfig | None = None) -> tuple[LlavaProcessor, LlavaConfig]:
    """The processor and config of the model ``spec`` describes, without loading (or, from S3,
    downloading) weights where possible (a checkpoint); presets and compositions are built."""
    if spec.checkpoint is not None:
        src = resolve_model_uri(spec.checkpoint, storage_config, weights=False)
        try:
            processor = AutoProcessor.from_pretrained(src)
            config = LlavaConfig.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ModelBuildError(f"cannot load a LLaVA processor/config from {spec.checkpoint!r}: {e}") from e
        return processor, config
    model, processor = build_model(spec, storage_config)
    return processor, model.config


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def save_model(model: PreTrainedModel, processor: LlavaProcessor, uri: str,
               storage_config: StorageConfig | None = None) -> str:
    """Write model + processor to a local path or s3:// URI in llava-hf's layout (see
    :func:`llava_platform.model.layouts.to_llava_hf_layout`), which transformers, vLLM and SGLang load."""
    if not storage.is_remote(uri):
        path = storage.strip_scheme(uri)
        _save_llava_hf(model, processor, path)
        return path
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _save_llava_hf(model, processor, tmp)
        storage.upload_dir(tmp, uri, storage_config)
    return uri


def _save_llava_hf(model: PreTrainedModel, processor: LlavaProcessor, path: str) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    to_llava_hf_layout(path)


def describe(model: LlavaForConditionalGeneration) -> dict[str, Any]:
    """Parameter counts per component and the facts that fix the image-token layout."""
    counts: dict[str, int] = {c: 0 for c in COMPONENTS}
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    v = model.config.vision_config
    return {
        "params": counts,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "image_tokens": num_image_tokens(model.config),
        "vocab_size": model.get_input_embeddings().weight.shape[0],
    }


__all__ = [
    "build_model",
    "compose",
    "describe",
    "load_checkpoint",
    "load_processor",
    "save_model",
]

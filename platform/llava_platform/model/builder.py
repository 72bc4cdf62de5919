"""Build a LLaVA model (HF ``LlavaForConditionalGeneration``) and its ``LlavaProcessor``.

Three sources, one assembly path:

- :func:`compose`: a CLIP vision tower + a causal LM (llama family) + a new projector. This is how
  ``openai/clip-vit-large-patch14-336`` + ``lmsys/vicuna-7b-v1.5`` become LLaVA-1.5 before stage 1.
- :func:`load_checkpoint`: an existing LLaVA checkpoint in HF format (``llava-hf/llava-1.5-7b-hf`` or an
  export of this platform), from a local path or ``s3://``.
- :func:`build_preset`: ``tiny`` / ``small`` models built from config (random init) with a byte-level
  BPE tokenizer trained locally on the synthetic world; tests and the demo use them, and they take
  exactly the same assembly, save and load path as a 7B model.

The projector is HF's ``LlavaMultiModalProjector`` (linear -> act -> linear). ``mlp2x_gelu`` is that
module with GELU. ``linear`` (LLaVA-1.0) uses the identity activation and starts with ``linear_2``
set to the identity, so it begins as a single linear map and stays linear while training (a product of
linear maps is linear); plain ``transformers`` loads either without custom code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_platform import storage
from llava_platform.config.schema import STAGE_TEMPLATES, LanguageModelSpec, ModelSpec, StorageConfig
from llava_platform.data import synthetic
from llava_platform.data.conversation import IMAGE_PLACEHOLDER, chat_template
from llava_platform.data.images import num_image_tokens
from llava_platform.errors import ModelBuildError
from llava_platform.model.components import build_language_model, default_image_processor
from llava_platform.model.layouts import to_llava_hf_layout
from llava_platform.model.tokenizer import PAD, train_bpe_tokenizer
from llava_platform.tracking.models import resolve_model_uri

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Preset:
    """Sizes of a preset model. ``image_size`` / ``patch_size`` fix the number of image tokens."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vocab_size: int
    corpus_scenes: int


PRESETS: dict[str, Preset] = {
    # Tests: builds in about a second; 16 image tokens.
    "tiny": Preset(32, 8, 32, 2, 2, 64, 2, 4, 512, 200),
    # Demo: a few million parameters; 64 image tokens, enough resolution for a 3x3 layout of shapes.
    "small": Preset(64, 8, 128, 4, 4, 256, 4, 4, 2048, 2000),
}


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


def build_preset(
    name: str,
    seed: int = 0,
    projector_type: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised preset model with a tokenizer trained on the synthetic corpus.

    ``image_size``/``patch_size`` override the preset's (benchmarks use 336/14, CLIP ViT-L/14-336's
    geometry, so that image work and token counts match a real LLaVA-1.5 run).

    Raises:
        ModelBuildError: unknown preset name.
    """
    if name not in PRESETS:
        raise ModelBuildError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if image_size or patch_size:
        p = replace(p, image_size=image_size or p.image_size, patch_size=patch_size or p.patch_size)
    tokenizer = train_bpe_tokenizer(synthetic.corpus(seed=seed, n_scenes=p.corpus_scenes), p.vocab_size)
    vision_cfg = CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=4 * p.vision_hidden,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.vision_hidden,
    )
    lm_spec = LanguageModelSpec(hidden_size=p.text_hidden, layers=p.text_layers, heads=p.text_heads,
                                vocab_size=p.vocab_size)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(vision_cfg)
    llm = build_language_model(lm_spec, tokenizer)
    image_processor = default_image_processor(p.image_size)
    spec = ModelSpec(preset=name, seed=seed, projector_type=projector_type,  # type: ignore[arg-type]
                     vision_feature_layer=vision_feature_layer,
                     vision_feature_select_strategy=vision_feature_select_strategy)  # type: ignore[arg-type]
    return assemble(vision, llm, tokenizer, image_processor, spec)


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


def assemble(
    vision: CLIPVisionModel,
    llm: PreTrainedModel,
    tokenizer: Any,
    image_processor: Any,
    spec: ModelSpec,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Put a vision tower, a causal LM and a new projector into one ``LlavaForConditionalGeneration``.

    Adds ``<image>`` and a pad token to the tokenizer when missing and resizes the embeddings; sets
    ``image_token_id``, patch size and the image-token count consistently in config and processor.

    Raises:
        ModelBuildError: the parts do not fit together.
    """
    vcfg = vision.config
    if vcfg.image_size % vcfg.patch_size:
        raise ModelBuildError(
            f"vision tower image_size {vcfg.image_size} is not a multiple of its patch_size {vcfg.patch_size}"
        )
    if tokenizer.eos_token is None:
        raise ModelBuildError("the tokenizer has no end-of-sequence token (eos_token); LLaVA turns end with it")
    if not hasattr(llm, "model") or not hasattr(llm, "lm_head"):
        raise ModelBuildError(
            f"{type(llm).__name__} is not a decoder with `.model` and `.lm_head` (llama family expected)"
        )
    if not -vcfg.num_hidden_layers - 1 <= spec.vision_feature_layer <= vcfg.num_hidden_layers:
        raise ModelBuildError(
            f"vision_feature_layer {spec.vision_feature_layer} is outside the tower's {vcfg.num_hidden_layers} layers"
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu" if spec.projector_type == "mlp2x_gelu" else "linear",
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(llm.config, "tie_word_embeddings", False),
    )
    config.image_seq_length = num_image_tokens(config)
    # Build the shell on the meta device (no memory for a second copy of a 7B model), then move the
    # loaded towers in and give only the projector real, freshly initialised weights.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    dtype = next(llm.parameters()).dtype
    projector = LlavaMultiModalProjector(config)
    if spec.projector_type == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.out_features))
            projector.linear_2.bias.zero_()
    model.model.multi_modal_projector = projector.to(dtype)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelBuildError(f"internal: tensors left uninitialised after assembly: {leftover[:5]}")
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    for gen_cfg in (model.generation_config,):
        gen_cfg.bos_token_id = tokenizer.bos_token_id
        gen_cfg.eos_token_id = tokenizer.eos_token_id
        gen_cfg.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template(STAGE_TEMPLATES["finetune"]),  # training exports record their own
    )
    return model, processor


# ---------------------------------------------------------------------------------------------
# Freezing per stage
# ---------------------------------------------------------------------------------------------

COMPONENTS = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "language_model": ("model.language_model.", "lm_head."),
}


def component_of(param_name: str) -> str:
    for comp, prefixes in COMPONENTS.items():
        if param_name.startswith(prefixes):
            return comp
    raise ModelBuildError(f"parameter {param_name} belongs to no known LLaVA component")


def apply_stage(model: torch.nn.Module, stage: str, unfreeze_vision_tower: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` for a LLaVA stage and report parameter counts.

    ``pretrain`` (stage 1, feature alignment) trains only the projector. ``finetune`` (stage 2, visual
    instruction tuning) trains projector + language model; the vision tower stays frozen unless
    ``unfreeze_vision_tower``.

    Returns:
        ``{"<component>_trainable": n, ..., "trainable": n, "total": n}``.

    Raises:
        ValueError: unknown stage.
    """
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}; choose pretrain or finetune")
    train = {"projector"}
    if stage == "finetune":
        train.add("language_model")
        if unfreeze_vision_tower:
            train.add("vision_tower")
    counts = {f"{c}_trainable": 0 for c in COMPONENTS}
    total = 0
    for name, param in model.named_parameters():
        comp = component_of(name)
        param.requires_grad_(comp in train)
        total += param.numel()
        if param.requires_grad:
            counts[f"{comp}_trainable"] += param.numel()
    counts["trainable"] = sum(counts.values())
    counts["total"] = total
    return counts


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
    "PRESETS",
    "apply_stage",
    "assemble",
    "build_model",
    "build_preset",
    "compose",
    "describe",
    "load_checkpoint",
    "load_processor",
    "save_model",
]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""One assembly path for every LLaVA this platform builds: a CLIP vision tower, a causal LM and a new
projector put into one ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``.

The projector is HF's ``LlavaMultiModalProjector`` (linear -> act -> linear). ``mlp2x_gelu`` is that
module with GELU. ``linear`` (LLaVA-1.0) uses the identity activation and starts with ``linear_2``
set to the identity, so it begins as a single linear map and stays linear while training (a product of
linear maps is linear); plain ``transformers`` loads either without custom code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_platform.config.schema import STAGE_TEMPLATES, ModelSpec
from llava_platform.data.conversation import IMAGE_PLACEHOLDER, chat_template
from llava_platform.data.images import num_image_tokens
from llava_platform.errors import ModelBuildError
from llava_platform.model.tokenizer import PAD

log = logging.getLogger(__name__)


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


# The parts of a LLaVA, by parameter-name prefix.
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

"""The one assembly path: a tower, a causal LM and a tokenizer become a LLaVA whose config, processor
and tokenizer agree (the <image> and pad tokens added, the embeddings resized), and every parameter
belongs to one of LLaVA's three parts."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_platform.config.components import LanguageModelSpec
from llava_platform.config.schema import ModelSpec
from llava_platform.data.images import num_image_tokens
from llava_platform.errors import ModelBuildError
from llava_platform.model.assembly import COMPONENTS, assemble, component_of
from llava_platform.model.components import build_language_model, default_image_processor
from llava_platform.model.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_bpe_tokenizer(["a red circle at the top left", "USER: what colour? ASSISTANT: red"] * 20, 320)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    llm = build_language_model(LanguageModelSpec(hidden_size=32, layers=1, heads=2, vocab_size=320), tokenizer)
    return vision, llm, tokenizer


def test_parts_fit_into_one_llava(parts):
    vision, llm, tokenizer = parts
    model, processor = assemble(vision, llm, tokenizer, default_image_processor(32), ModelSpec(preset="tiny"))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert model.config.image_token_id == image_id and processor.tokenizer.pad_token_id is not None
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)
    assert num_image_tokens(model.config) == 16 and processor.patch_size == 8
    assert {component_of(n) for n, _ in model.named_parameters()} == set(COMPONENTS)
    with pytest.raises(ModelBuildError, match="belongs to no known LLaVA component"):
        component_of("some.other.weight")


def test_linear_projector_starts_as_one_linear_map(parts):
    vision, llm, tokenizer = parts
    model, _ = assemble(vision, llm, tokenizer, default_image_processor(32), ModelSpec(preset="tiny", projector_type="linear"))
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    x = torch.randn(3, proj.linear_1.in_features)
    torch.testing.assert_close(proj(x), proj.linear_1(x))

"""Prompts as training tokenized them: the image expanded, the assistant's turn open, and each
refusal a PromptError naming the part of the request at fault."""

from __future__ import annotations

import pytest

from llava_platform.config.schema import ModelSpec
from llava_platform.data.images import ImageSpec
from llava_platform.inference.prompts import PromptBuilder, PromptError
from llava_platform.model.builder import load_processor


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    processor, config = load_processor(ModelSpec(checkpoint=str(tiny_model_dir)))
    return PromptBuilder(processor, config, ImageSpec.from_model(config, processor), max_new_tokens=64,
                         max_prompt_chars=100)


def _refused(fn, *args) -> PromptError:
    with pytest.raises(PromptError) as e:
        fn(*args)
    return e.value


def test_the_image_is_expanded_and_the_assistant_turn_is_open(builder):
    ids = builder.input_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}])
    assert ids.count(builder.image_token_id) == builder.spec.num_tokens
    assert builder.tokenizer.decode(ids).rstrip().endswith("ASSISTANT:")


def test_conversations_it_refuses(builder):
    err = _refused(builder.input_ids, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert (err.code, err.param) == ("invalid_role", "messages.1.role")
    token = builder.tokenizer.convert_ids_to_tokens(builder.image_token_id)
    assert _refused(builder.input_ids, [{"role": "user", "content": f"a {token} b"}]).code == "invalid_content"
    assert _refused(builder.check_text, 101).code == "prompt_too_long"
    builder.check_text(100)


def test_completion_budget_and_context(builder):
    assert builder.completion_budget(None, "max_tokens", 10) == 64
    assert builder.completion_budget(5, "max_tokens", 10) == 5
    assert _refused(builder.completion_budget, 65, "max_tokens", 10).param == "max_tokens"
    assert _refused(builder.completion_budget, 0, "max_completion_tokens", 10).param == "max_completion_tokens"
    err = _refused(builder.completion_budget, 10, "max_tokens", builder.context_length - 5)
    assert err.code == "context_length_exceeded" and str(builder.context_length) in err.message
    assert builder.completion_budget(None, "max_tokens", builder.context_length - 5) == 5
    assert _refused(builder.completion_budget, None, "max_tokens", builder.context_length).code == "context_length_exceeded"

"""Images and prompts: every refusal is an ApiError with the status and param a client needs."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from serve_helpers import data_url, png

from llava_platform.model.builder import load_processor
from llava_platform.config.schema import ModelSpec
from llava_platform.serve.engine import ImageSpec
from llava_platform.serve.inputs import (Limits, PromptBuilder, decode_data_url, fetch_image, load_images,
                                         prepare_image_bytes, template_messages)
from llava_platform.serve.protocol import ApiError, parse_request


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    processor, config = load_processor(ModelSpec(checkpoint=str(tiny_model_dir)))
    spec = ImageSpec.from_model(config, processor)
    return PromptBuilder(processor, config, spec, Limits(max_new_tokens=64, max_images=1))


def _request(content, **kw):
    return parse_request({"model": "llava", "messages": [{"role": "user", "content": content}], **kw})


def _refused(fn, *args, status=400):
    with pytest.raises(ApiError) as e:
        r = fn(*args)
        if asyncio.iscoroutine(r):
            asyncio.run(r)
    assert e.value.status == status
    return e.value


def test_data_url_decoding_and_its_errors():
    raw = png()
    assert decode_data_url(data_url(raw), "p", Limits()) == raw
    assert _refused(decode_data_url, "data:image/png;base64,@@@", "p", Limits()).code == "invalid_base64"
    assert _refused(decode_data_url, "data:image/png,plain", "p", Limits()).code == "invalid_image_url"
    big = Limits(max_image_bytes=10)
    assert _refused(decode_data_url, data_url(raw), "p", big).code == "image_too_large"


def test_images_that_are_not_images_or_too_many_pixels(builder):
    assert _refused(prepare_image_bytes, b"not an image at all", "p", builder.spec, Limits()).code == "invalid_image"
    assert _refused(prepare_image_bytes, png()[:60], "p", builder.spec, Limits()).code == "invalid_image"
    # A decompression bomb: a few KB of PNG that expands to 25 megapixels.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    err = _refused(prepare_image_bytes, buf.getvalue(), "p", builder.spec, Limits(max_image_pixels=1_000_000))
    assert err.code == "image_too_large" and "25000000" in err.message
    ok = prepare_image_bytes(png(), "p", builder.spec, Limits())
    assert ok.pixels.shape == (builder.spec.size, builder.spec.size, 3) and len(ok.key) == 64


def test_remote_urls_need_an_allowlisted_host():
    err = _refused(fetch_image, "https://example.com/cat.png", "p", Limits(), None)
    assert err.code == "image_url_not_allowed" and "example.com" in err.message
    assert _refused(fetch_image, "file:///etc/passwd", "p", Limits(), None).code == "invalid_image_url"


def test_load_images_counts_and_orders(builder):
    two = [{"type": "image_url", "image_url": {"url": data_url(png("red"))}},
           {"type": "image_url", "image_url": {"url": data_url(png("blue"))}}]
    err = _refused(load_images, _request(two), builder.spec, Limits(max_images=1), None)
    assert err.code == "too_many_images"
    images = asyncio.run(load_images(_request(two), builder.spec, Limits(max_images=2), None))
    mid = builder.spec.size // 2
    assert [bool(i.pixels[mid, mid, 2] > 100) for i in images] == [False, True]
    with pytest.raises(ApiError, match="only accepted in user messages"):
        asyncio.run(load_images(parse_request({"model": "m", "messages": [
            {"role": "assistant", "content": two[:1]}, {"role": "user", "content": "x"}]}), builder.spec, Limits(), None))


def test_prompt_expands_the_image_and_ends_with_the_assistant_turn(builder):
    req = _request([{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "colour?"}])
    ids = builder.input_ids(template_messages(req.messages))
    assert ids.count(builder.image_token_id) == builder.spec.num_tokens
    assert builder.tokenizer.decode(ids).rstrip().endswith("ASSISTANT:")
    assert template_messages(parse_request({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                            {"role": "user", "content": "x"}]}).messages)[0]["role"] == "system"


def test_token_budget_and_context(builder):
    req = _request("hi", max_tokens=65)
    assert _refused(builder.max_new_tokens, req, 10).param == "max_tokens"
    assert builder.max_new_tokens(_request("hi"), 10) == 64
    err = _refused(builder.max_new_tokens, _request("hi", max_tokens=10), builder.context_length - 5)
    assert err.code == "context_length_exceeded" and str(builder.context_length) in err.message
    last_assistant = parse_request({"model": "m", "messages": [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]})
    assert _refused(builder.build, last_assistant, []).code == "invalid_role"

"""Images and prompts: every refusal is an ApiError with the status and param a client needs."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import subprocess
import sys

import pytest
from PIL import Image
from inference_helpers import data_url, png

from llava_platform.config.schema import ModelSpec, ServeConfig
from llava_platform.model.builder import load_processor
from llava_platform.data.images import ImageSpec
from llava_platform.serve.inputs import (Limits, build_prompt, decode_data_url, fetch_image, load_images, load_prompts,
                                         prepare_image_bytes, prompt_builder, template_messages)
from llava_platform.serve.protocol import ApiError, parse_request


@pytest.fixture(scope="module")
def model_parts(tiny_model_dir):
    processor, config = load_processor(ModelSpec(checkpoint=str(tiny_model_dir)))
    return processor, config, ImageSpec.from_model(config, processor)


@pytest.fixture(scope="module")
def builder(model_parts):
    return prompt_builder(*model_parts, Limits(max_new_tokens=64, max_images=1))


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


def test_template_messages_map_openai_roles_and_parts():
    req = _request([{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "colour?"}])
    assert template_messages(req.messages) == [{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "colour?"}]}]
    assert template_messages(parse_request({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                            {"role": "user", "content": "x"}]}).messages)[0]["role"] == "system"


def test_prompt_refusals_are_400s_naming_the_param(builder, model_parts):
    prompt = build_prompt(builder, _request("hi"), [])
    assert prompt.max_new_tokens == 64 and builder.tokenizer.decode(prompt.input_ids).rstrip().endswith("ASSISTANT:")
    assert _refused(build_prompt, builder, _request("hi", max_tokens=65), []).param == "max_tokens"
    assert _refused(build_prompt, builder, _request("hi", max_completion_tokens=0), []).param == "max_completion_tokens"
    last_assistant = parse_request({"model": "m", "messages": [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]})
    assert _refused(build_prompt, builder, last_assistant, []).code == "invalid_role"
    small = prompt_builder(*model_parts, Limits(max_prompt_chars=3))
    assert _refused(build_prompt, small, _request("four"), []).code == "prompt_too_long"


# Run in a fresh interpreter: the Gateway module and the pickled prompt builder, nothing else.
_GATEWAY_SIDE = """
import json, pickle, sys
import llava_platform.serve.gateway
prompts = pickle.loads(sys.stdin.buffer.read())
print(json.dumps({"torch": "torch" in sys.modules, "ids": prompts.input_ids(json.loads(sys.argv[1])),
                  "spec": [prompts.spec.size, prompts.spec.num_tokens]}))
"""


def test_the_gateway_gets_its_prompt_builder_whole_and_never_imports_torch(tiny_model_dir):
    """What build_app hands the Gateway tokenizes as the builder made here does, in a process that
    imports the Gateway's module and no torch (the Gateway loads no model: issue 13)."""
    prompts = load_prompts(ServeConfig(model=str(tiny_model_dir)))
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the triangle?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the circle? ünïcödé 🙂"}]
    proc = subprocess.run([sys.executable, "-c", _GATEWAY_SIDE, json.dumps(messages)], input=pickle.dumps(prompts),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    side = json.loads(proc.stdout.decode().splitlines()[-1])
    assert side["torch"] is False
    assert side["ids"] == prompts.input_ids(messages) and side["ids"].count(prompts.image_token_id) == prompts.spec.num_tokens
    assert side["spec"] == [prompts.spec.size, prompts.spec.num_tokens]

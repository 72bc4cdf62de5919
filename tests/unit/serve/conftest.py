"""Fixtures shared by the tests of the Serve application (test_deployments, test_web)."""

from __future__ import annotations

import openai
import pytest
from inference_helpers import reference_greedy


@pytest.fixture(scope="module")
def reference(serve_app):
    """``greedy(messages, images, max_new_tokens)``: what the plain transformers model answers in this
    process, greedily, for an OpenAI-style conversation (the expected output of the Serve app)."""
    from llava_platform.data.images import ImageSpec
    from llava_platform.inference.engine import load_for_serving
    from llava_platform.serve.inputs import template_messages
    from llava_platform.serve.protocol import parse_request

    model, processor = load_for_serving(str(serve_app.model_dir))
    spec = ImageSpec.from_model(model.config, processor)

    def greedy(messages: list[dict], images: list[bytes], max_new_tokens: int) -> str:
        req = parse_request({"model": "llava", "messages": messages})
        return reference_greedy(model, processor, spec, template_messages(req.messages), images, max_new_tokens)

    return greedy


@pytest.fixture(scope="module")
def client(serve_app):
    """The official openai client on the session's Serve app."""
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="unused", max_retries=0, timeout=60)

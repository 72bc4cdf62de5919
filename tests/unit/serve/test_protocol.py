"""Request validation errors name the field, in OpenAI's error shape."""

from __future__ import annotations

import pytest

from llava_platform.serve.protocol import ApiError, chunk_body, completion_body, parse_request

GOOD = {"model": "llava", "messages": [{"role": "user", "content": "hi"}]}


def _error(payload) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(payload)
    assert e.value.status == 400
    return e.value


def test_good_request_with_parts_and_defaults():
    req = parse_request({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}],
        "stop": "\n", "max_tokens": 5})
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.stop_strings() == ["\n"]
    assert req.requested_max_tokens() == 5
    assert parse_request({**GOOD, "max_completion_tokens": 3}).requested_max_tokens() == 3


@pytest.mark.parametrize("payload, param, words", [
    ({"messages": GOOD["messages"]}, "model", "Missing required parameter"),
    ({"model": "llava"}, "messages", "Missing required parameter"),
    ({**GOOD, "messages": []}, "messages", "at least one message"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Invalid role 'robot'"),
    ({**GOOD, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "messages.0.content.0",
     "Invalid content part type 'audio'"),
    ({**GOOD, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({**GOOD, "top_p": 0}, "top_p", "greater than 0"),
    ({**GOOD, "n": 2}, "n", "Invalid value"),
    ({**GOOD, "max_token": 5}, "max_token", "Unrecognized request argument supplied: max_token"),
])
def test_invalid_requests_name_the_field(payload, param, words):
    err = _error(payload)
    assert err.param == param and words in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_body_must_be_an_object_and_stop_is_bounded():
    assert "JSON object" in _error([1, 2]).message
    with pytest.raises(ApiError, match="at most 4"):
        parse_request({**GOOD, "stop": ["a", "b", "c", "d", "e"]}).stop_strings()


def test_response_bodies_have_openai_fields():
    body = completion_body("chatcmpl-1", "llava", "red", "stop", 10, 2, created=5)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "red"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    assert chunk_body("c", "llava", 5, None, usage_counts={"x": 1})["choices"] == []

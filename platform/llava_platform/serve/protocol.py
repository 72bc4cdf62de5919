"""The OpenAI chat-completions wire format: request validation, response bodies, error bodies.

Requests are validated strictly (an unknown argument is a 400 naming it, as OpenAI does), and every
failure becomes an :class:`ApiError` carrying the HTTP status and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_platform.data.conversation import lone_surrogate


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx, or 503 when no replica can answer) and an
    OpenAI-shaped body; ``retry_after``: seconds for the ``Retry-After`` header."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not a number and "yes" not a boolean, as OpenAI answers.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. Arguments the model cannot honour (``n > 1``, logprobs, tools)
    are refused by name rather than silently ignored."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's range (int64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"`stop` takes at most 4 sequences, got {len(stops)}", "stop", "invalid_value")
        if any(not s for s in stops):
            raise ApiError(400, "`stop` sequences must be non-empty strings", "stop", "invalid_value")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(payload: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body.

    Raises:
        ApiError: 400 naming the first offending field (dotted path, as OpenAI's ``param``).
    """
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(payload).__name__}")
    bad = lone_surrogate(payload)
    if bad is not None:
        raise ApiError(400, f"{bad} contains a lone UTF-16 surrogate (an escape such as \\ud800 that is half of a "
                       "character pair): the text is not valid Unicode; send the whole character or remove it",
                       bad, "invalid_unicode")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        # For `content: str | list[part]` pydantic reports both branches; the deepest error is the
        # one that says what is wrong (e.g. the part whose type is unknown).
        errors = e.errors()
        err = max(errors, key=lambda x: len(x["loc"]))
        if len(err["loc"]) == len(errors[0]["loc"]):
            err = errors[0]
        loc = [str(p) for p in err["loc"]]
        # Drop pydantic's union/discriminator tags from the path: messages.0.content.1.image_url...
        param = ".".join(p for p in loc if p not in ("str", "list[tagged-union[TextPart,ImagePart]]")
                         and not p.startswith(("function-", "tagged-union")))
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif kind == "missing":
            msg = f"Missing required parameter: {param!r}"
        elif kind == "union_tag_invalid":
            tag = (err.get("ctx") or {}).get("tag")
            msg = (f"Invalid content part type {tag!r} at {param}: supported types are 'text' and 'image_url'")
            kind = "unsupported_content_type"
        elif kind == "literal_error" and param.endswith("role"):
            msg = (f"Invalid role {err.get('input')!r} at {param}: "
                   "expected one of 'system', 'developer', 'user', 'assistant'")
            kind = "invalid_role"
        elif kind == "too_short" and param == "messages":
            msg = "`messages` must contain at least one message"
        else:
            msg = f"Invalid value for {param!r}: {err['msg']}"
        raise ApiError(400, msg, param or None, kind) from e


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (one SSE event); the usage chunk has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llava-platform"}]}

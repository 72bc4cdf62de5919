"""From a validated chat request to model input: images fetched, checked and prepared; the
conversation rendered with the model's chat template and tokenized; limits enforced.

Everything here raises :class:`~llava_platform.serve.protocol.ApiError` with the status and the
message the client should see, so the gateway turns every bad input into a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from llava_platform.config.schema import STAGE_TEMPLATES
from llava_platform.data.conversation import chat_ids, chat_template
from llava_platform.data.images import MAX_ASPECT_RATIO
from llava_platform.errors import RecordError, TemplateError
from llava_platform.serve.engine import ImageSpec
from llava_platform.serve.protocol import ApiError, ChatCompletionRequest, Message

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from :class:`~llava_platform.config.schema.ServeConfig`)."""

    max_images: int = 1
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_new_tokens: int = 1024
    allowed_image_hosts: tuple[str, ...] = ()
    max_prompt_chars: int = 262_144
    max_image_aspect_ratio: float = MAX_ASPECT_RATIO

    @classmethod
    def from_config(cls, cfg: Any) -> "Limits":
        return cls(cfg.max_images_per_request, cfg.max_image_bytes, cfg.max_image_pixels,
                   cfg.max_new_tokens_limit, tuple(h.lower() for h in cfg.allowed_image_hosts),
                   cfg.max_prompt_chars, cfg.max_image_aspect_ratio)


@dataclass
class PreparedImage:
    """An image ready for the vision tower, with the content hash the encoder caches by."""

    key: str
    pixels: np.ndarray


@dataclass
class Prompt:
    input_ids: list[int]
    images: list[PreparedImage]
    max_new_tokens: int


def image_refs(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """``(param path, url)`` of every image part, in conversation order.

    Raises:
        ApiError: an image outside a user message.
    """
    refs = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            continue
        for j, part in enumerate(m.content):
            if part.type == "image_url":
                param = f"messages.{i}.content.{j}.image_url.url"
                if m.role != "user":
                    raise ApiError(400, f"images are only accepted in user messages ({param} is in a {m.role} message)",
                                   param, "invalid_image_position")
                refs.append((param, part.image_url.url))
    return refs


def decode_data_url(url: str, param: str, limits: Limits) -> bytes:
    """The bytes of a ``data:<mime>;base64,...`` URL.

    Raises:
        ApiError: not a base64 data URL, invalid base64, or over the byte limit.
    """
    m = _DATA_URL.match(url)
    if m is None:
        raise ApiError(400, f"{param}: a data URL must look like data:image/png;base64,<data>", param, "invalid_image_url")
    data = m.group("data").strip()
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(400, f"{param}: the image is over the limit of {limits.max_image_bytes} bytes",
                       param, "image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: the data URL is not valid base64 ({e})", param, "invalid_base64") from e
    if len(raw) > limits.max_image_bytes:
        raise ApiError(400, f"{param}: the image is {len(raw)} bytes, over the limit of {limits.max_image_bytes}",
                       param, "image_too_large")
    return raw


async def fetch_image(url: str, param: str, limits: Limits, client: Any) -> bytes:
    """The bytes behind an http(s) image URL whose host is in the allowlist (empty by default).

    Raises:
        ApiError: scheme not supported, host not allowed, fetch failed, or over the byte limit.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ApiError(400, f"{param}: unsupported image URL scheme {parts.scheme!r}; "
                       "send a data:image/...;base64 URL", param, "invalid_image_url")
    host = (parts.hostname or "").lower()
    if host not in limits.allowed_image_hosts:
        raise ApiError(400, f"{param}: fetching images from {host!r} is not allowed on this server; send the image "
                       "inline as a data: URL", param, "image_url_not_allowed")
    try:
        async with client.stream("GET", url, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise ApiError(400, f"{param}: fetching the image returned HTTP {resp.status_code}", param, "image_fetch_failed")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise ApiError(400, f"{param}: the image is over the limit of {limits.max_image_bytes} bytes",
                                   param, "image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except Exception as e:  # httpx's transport errors and timeouts
        raise ApiError(400, f"{param}: could not fetch the image: {type(e).__name__}: {e}", param, "image_fetch_failed") from e


def prepare_image_bytes(raw: bytes, param: str, spec: ImageSpec, limits: Limits) -> PreparedImage:
    """Decode (pixel limit first, so a decompression bomb is refused before it is expanded), square
    and resize one image.

    Raises:
        ApiError: not an image, truncated, empty, or over the pixel limit.
    """
    try:
        pixels = spec.prepare(raw, limits.max_image_pixels, limits.max_image_aspect_ratio)
    except RecordError as e:
        if e.reason == "image_too_large":
            raise ApiError(400, f"{param}: the image is too large: {e.detail}", param, "image_too_large") from e
        if e.reason == "image_aspect_ratio":
            raise ApiError(400, f"{param}: the image is too thin: {e.detail}", param, "image_aspect_ratio") from e
        raise ApiError(400, f"{param}: the bytes are not a readable image ({e.detail})", param, "invalid_image") from e
    return PreparedImage(hashlib.sha256(raw).hexdigest(), pixels)


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI messages -> the chat template's messages (``{"type": "image"}`` parts for images)."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            content: Any = m.content
        else:
            content = [{"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text}
                       for p in m.content]
        out.append({"role": role, "content": content})
    return out


class PromptBuilder:
    """Renders and tokenizes conversations for one model and checks them against its context."""

    def __init__(self, processor: Any, model_config: Any, spec: ImageSpec, limits: Limits, template: str | None = None):
        """``template``: a named conversation template (``vicuna_v1``, ``llava_v1``, ``plain``) instead
        of the model's own chat template (the one it was trained with; ``vicuna_v1`` when it has none)."""
        self.tokenizer = processor.tokenizer
        own = getattr(processor, "chat_template", None)
        self.template = chat_template(template) if template else (own or chat_template(STAGE_TEMPLATES["finetune"]))
        self.image_token_id = model_config.image_token_id
        self.context_length = int(model_config.text_config.max_position_embeddings)
        self.spec = spec
        self.limits = limits

    def input_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Tokenized prompt ending in the assistant's turn, with each ``<image>`` expanded.

        Raises:
            ApiError: the template refuses the conversation (e.g. roles out of order).
        """
        if messages and messages[-1]["role"] == "assistant":
            raise ApiError(400, "the last message must be from the user (or system), not the assistant",
                           f"messages.{len(messages) - 1}.role", "invalid_role")
        try:  # the ids training used (LLaVA's tokenization of the rendered prompt)
            ids, _ = chat_ids(self.tokenizer, messages, self.template, add_generation_prompt=True, with_mask=False)
        except TemplateError as e:  # jinja's raise_exception
            raise ApiError(400, f"the conversation cannot be rendered for this model: {e}", "messages",
                           "invalid_conversation") from e
        images = sum(1 for m in messages if not isinstance(m["content"], str)
                     for p in m["content"] if p.get("type") == "image")
        if ids.count(self.image_token_id) != images:
            raise ApiError(400, f"the message text contains the model's reserved image token "
                           f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}; send images as "
                           "image_url parts and leave the token out of the text", "messages", "invalid_content")
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.spec.num_tokens if t == self.image_token_id else [t])
        return out

    def max_new_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The completion budget: the request's, checked against the limit and the context length.

        Raises:
            ApiError: out of range, or the prompt (plus the requested completion) does not fit.
        """
        asked = request.requested_max_tokens()
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if asked is not None and not 1 <= asked <= self.limits.max_new_tokens:
            raise ApiError(400, f"`{param}` must be between 1 and {self.limits.max_new_tokens}, got {asked}",
                           param, "invalid_value")
        room = self.context_length - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                           f"you requested {prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, "
                           f"{asked or 1} in the completion). Please reduce the length of the messages or completion.",
                           "messages", "context_length_exceeded")
        return asked if asked is not None else min(room, self.limits.max_new_tokens)

    def build(self, request: ChatCompletionRequest, images: list[PreparedImage]) -> Prompt:
        """The prompt's ids and completion budget.

        Raises:
            ApiError: the text is over ``max_prompt_chars`` (checked before tokenizing, which costs
                time in proportion), or see :meth:`input_ids` and :meth:`max_new_tokens`.
        """
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if p.type == "text") for m in request.messages)
        if chars > self.limits.max_prompt_chars:
            raise ApiError(400, f"the messages hold {chars} characters of text, over this server's limit of "
                           f"{self.limits.max_prompt_chars}", "messages", "prompt_too_long")
        ids = self.input_ids(template_messages(request.messages))
        return Prompt(ids, images, self.max_new_tokens(request, len(ids)))


async def load_images(request: ChatCompletionRequest, spec: ImageSpec, limits: Limits, client: Any) -> list[PreparedImage]:
    """Fetch/decode, check and prepare every image of a request, in order.

    Raises:
        ApiError: too many images, or any image refused (see the functions above).
    """
    refs = image_refs(request.messages)
    if len(refs) > limits.max_images:
        raise ApiError(400, f"the request has {len(refs)} images; this server accepts at most {limits.max_images} "
                       "per request", "messages", "too_many_images")
    images = []
    for param, url in refs:
        if url.startswith("data:"):
            raw = decode_data_url(url, param, limits)
        else:
            raw = await fetch_image(url, param, limits, client)
        # Decoding and resizing are CPU work: off the event loop.
        images.append(await asyncio.to_thread(prepare_image_bytes, raw, param, spec, limits))
    return images

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

from llava_platform.config.schema import ModelSpec, ServeConfig
from llava_platform.data.images import Decoding, ImageSpec
from llava_platform.errors import RecordError
from llava_platform.inference.prompts import PromptBuilder, PromptError
from llava_platform.serve.protocol import ApiError, ChatCompletionRequest, Message
from llava_platform.tracking.runs import use_tracking_uri

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)


_SERVE = ServeConfig.model_fields  # the limits' defaults are the Serve app's


@dataclass(frozen=True)
class Limits:
    """Per-request limits: :class:`~llava_platform.config.schema.ServeConfig`'s, under short names."""

    max_images: int = _SERVE["max_images_per_request"].default
    max_image_bytes: int = _SERVE["max_image_bytes"].default
    max_image_pixels: int = _SERVE["max_image_pixels"].default
    max_new_tokens: int = _SERVE["max_new_tokens_limit"].default
    allowed_image_hosts: tuple[str, ...] = ()
    max_prompt_chars: int = _SERVE["max_prompt_chars"].default
    max_image_aspect_ratio: float = _SERVE["max_image_aspect_ratio"].default

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Limits":
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


def prompt_builder(processor: Any, model_config: Any, spec: ImageSpec, limits: Limits,
                   template: str | None = None) -> PromptBuilder:
    """The model's :class:`~llava_platform.inference.prompts.PromptBuilder` under these limits."""
    return PromptBuilder(processor, model_config, spec, limits.max_new_tokens, limits.max_prompt_chars, template)


def load_prompts(args: ServeConfig) -> PromptBuilder:
    """The served model's prompt builder from its processor and config (no weights; MLflow URIs
    resolve against ``args.tracking_uri``). It pickles as a tokenizer, a chat template and numbers,
    so the Gateway gets it whole and imports neither torch nor the model's code (transformers' config
    classes import torch); measured in bench/serve.py (e)."""
    from llava_platform.model.builder import load_processor  # torch

    use_tracking_uri(args.tracking_uri)
    processor, config = load_processor(ModelSpec(checkpoint=args.model), args.storage)
    spec = ImageSpec.from_model(config, processor, args.image_aspect_ratio, Decoding.from_config(args))
    return prompt_builder(processor, config, spec, Limits.from_config(args))


def build_prompt(builder: PromptBuilder, request: ChatCompletionRequest, images: list[PreparedImage]) -> Prompt:
    """The request's prompt ids and completion budget (CPU work: callers on an event loop run it in
    a thread).

    Raises:
        ApiError: 400, for what :class:`~llava_platform.inference.prompts.PromptError` names: text
            over the limit (checked before tokenizing), a conversation the template refuses, a budget
            out of range or past the context.
    """
    chars = sum(len(m.content) if isinstance(m.content, str) else
                sum(len(p.text) for p in m.content if p.type == "text") for m in request.messages)
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    try:
        builder.check_text(chars)
        ids = builder.input_ids(template_messages(request.messages))
        return Prompt(ids, images, builder.completion_budget(request.requested_max_tokens(), param, len(ids)))
    except PromptError as e:
        raise ApiError(400, e.message, e.param, e.code) from e


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

"""Terminal chat, like LLaVA's ``llava.serve.cli``: against a Serve endpoint (the ``openai`` client,
streaming) or a local model directory with no server (the same split inference the deployments run).

    llava-platform chat --endpoint http://127.0.0.1:8000 --image cat.png
    llava-platform chat --model demo_run/models/finetune --image cat.png
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from llava_platform.errors import LlavaPlatformError
from llava_platform.serve.protocol import ApiError


class ChatError(LlavaPlatformError):
    """The chat cannot start or a turn failed (bad image path, endpoint unreachable, API error)."""


def image_part(path: str | Path) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part carrying the file inline as a base64 data URL.

    Raises:
        ChatError: the file cannot be read.
    """
    import base64

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ChatError(f"cannot read image {path}: {e}") from e
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(raw).decode()}}


class EndpointBackend:
    """Streams answers from an OpenAI-compatible endpoint (ours, or any other)."""

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None):
        import openai

        base = endpoint.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        self.client = openai.OpenAI(base_url=base, api_key=api_key or os.environ.get("LLAVA_API_KEY") or "none",
                                    max_retries=1, timeout=300)
        try:
            self.model = model or self.client.models.list().data[0].id
        except openai.OpenAIError as e:
            raise ChatError(f"cannot reach {base}: {e}") from e
        self.name = f"{self.model} at {base}"

    def stream(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> Iterator[str]:
        import openai

        try:
            for chunk in self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                             max_tokens=max_tokens, temperature=temperature):
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            raise ChatError(f"the server refused the request ({e.status_code}): "
                            f"{(body.get('error') or body).get('message', e.message) if body else e.message}") from e
        except openai.OpenAIError as e:
            raise ChatError(f"request failed: {e}") from e


class LocalBackend:
    """Runs the model in this process: the vision side and the batched decoder the deployments use."""

    def __init__(self, model: str, storage_config: Any = None, dtype: str = "float32", max_images: int = 4):
        from llava_platform.data.images import ImageSpec
        from llava_platform.inference.engine import Decoder, ImageEncoderCore, load_for_serving
        from llava_platform.serve.inputs import Limits, prompt_builder

        loaded, processor = load_for_serving(model, storage_config, dtype)
        self.spec = ImageSpec.from_model(loaded.config, processor)
        self.limits = Limits(max_images=max_images, max_new_tokens=4096)
        self.prompts = prompt_builder(processor, loaded.config, self.spec, self.limits)
        self.encoder, self.decoder = ImageEncoderCore(loaded, self.spec), Decoder(loaded, processor.tokenizer)
        self.name = f"local model {model}"

    def stream(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> Iterator[str]:
        from llava_platform.inference.requests import DecodeRequest
        from llava_platform.serve.inputs import build_prompt, load_images
        from llava_platform.serve.protocol import parse_request

        try:
            request = parse_request({"model": "local", "messages": messages, "max_tokens": max_tokens,
                                     "temperature": temperature})
            images = asyncio.run(load_images(request, self.spec, self.limits, None))
            prompt = build_prompt(self.prompts, request, images)
        except ApiError as e:
            raise ChatError(e.message) from e
        feats = self.encoder([i.pixels for i in images]) if images else []
        req = DecodeRequest(prompt.input_ids, prompt.max_new_tokens, temperature)
        for step in self.decoder.stream([req], [feats]):
            if step[0] is not None and step[0].text:
                yield step[0].text


def chat_loop(backend: Any, image: str | Path | None, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
              max_tokens: int = 256, temperature: float = 0.2) -> list[dict[str, Any]]:
    """Ask, stream the answer, repeat until an empty line, ``exit`` or end of input. The image rides
    with the first question. Returns the conversation.

    Raises:
        ChatError: the image cannot be read, or a turn failed.
    """
    pending_image = image_part(image) if image else None
    messages: list[dict[str, Any]] = []
    print(f"Chatting with {backend.name}. An empty line or `exit` ends the chat.", file=out, flush=True)
    while True:
        try:
            text = read("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            break
        if not text or text.lower() in ("exit", "quit"):
            break
        content: Any = [pending_image, {"type": "text", "text": text}] if pending_image else text
        pending_image = None
        messages.append({"role": "user", "content": content})
        print("ASSISTANT: ", end="", file=out, flush=True)
        answer = ""
        for piece in backend.stream(messages, max_tokens, temperature):
            answer += piece
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        messages.append({"role": "assistant", "content": answer})
    return messages

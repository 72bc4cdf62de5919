"""Shared by the serve tests: small images and the single-process reference output."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from llava_platform.data.images import normalize


def png(colour: str = "red", size: tuple[int, int] = (40, 30), shape: str | None = None) -> bytes:
    img = Image.new("RGB", size, colour)
    if shape:
        from PIL import ImageDraw

        ImageDraw.Draw(img).ellipse((5, 5, size[0] - 5, size[1] - 5), fill="white")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def user_image_message(raw: bytes, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}},
                                        {"type": "text", "text": text}]}


def reference_greedy(model, processor, spec, builder_messages, images: list[bytes], max_new_tokens: int) -> str:
    """What the plain transformers model generates in one process: ``generate(pixel_values=...)``
    with greedy decoding, on the same rendered prompt."""
    from llava_platform.inference.prompts import PromptBuilder

    builder = PromptBuilder(processor, model.config, spec)
    ids = builder.input_ids(builder_messages)
    kwargs = {}
    if images:
        arrays = [spec.prepare(b, 10**8) for b in images]
        import numpy as np

        kwargs["pixel_values"] = normalize(np.stack(arrays), spec.mean, spec.std)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return processor.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

"""One LLaVA record -> one training sample (tokens, labels, uint8 image), and the collate that turns
samples into the tensors ``LlavaForConditionalGeneration`` takes.

The same :func:`encode_record` runs inside the Ray Data pipeline and in the single-process reference
(LLaVA's ``LazySupervisedDataset`` style), so the two produce identical samples by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from llava_platform.data.conversation import IGNORE_INDEX, RecordPolicy, tokenize_record
from llava_platform.data.images import MAX_ASPECT_RATIO, AspectRatio, Decoding, ImageSpec, normalize, num_image_tokens


@dataclass(frozen=True)
class SampleSpec:
    """Everything that fixes how records become samples (its fields go into the data manifest)."""

    template: str
    max_length: int
    image_size: int
    num_image_tokens: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    aspect_ratio: AspectRatio = "pad"
    max_image_pixels: int = 89_478_485
    max_image_aspect_ratio: float = MAX_ASPECT_RATIO
    decoding: Decoding = Decoding()
    record_policy: RecordPolicy = "llava"

    @classmethod
    def from_processor(cls, processor: Any, model_config: Any, template: str, max_length: int,
                       aspect_ratio: AspectRatio = "pad", max_image_pixels: int = 89_478_485,
                       max_image_aspect_ratio: float = MAX_ASPECT_RATIO,
                       decoding: Decoding = Decoding(), record_policy: RecordPolicy = "llava") -> "SampleSpec":
        ip = processor.image_processor
        return cls(
            template=template,
            max_length=max_length,
            image_size=model_config.vision_config.image_size,
            num_image_tokens=num_image_tokens(model_config),
            image_mean=tuple(ip.image_mean),  # type: ignore[arg-type]
            image_std=tuple(ip.image_std),  # type: ignore[arg-type]
            aspect_ratio=aspect_ratio,
            max_image_pixels=max_image_pixels,
            max_image_aspect_ratio=max_image_aspect_ratio,
            decoding=decoding,
            record_policy=record_policy,
        )

    @property
    def image(self) -> ImageSpec:
        """The image half of the spec: what serving and evaluation prepare images with."""
        return ImageSpec(self.image_size, self.image_mean, self.image_std, self.num_image_tokens, self.aspect_ratio,
                         self.decoding)


def encode_record(record: dict[str, Any], image_bytes: bytes | None, tokenizer: Any, spec: SampleSpec) -> dict[str, Any]:
    """Tokenize a record and prepare its image.

    Returns:
        ``{"id", "input_ids", "labels", "length", "has_image", "image"}``; ``image`` is uint8 HWC or None.

    Raises:
        RecordError: the record or its image is invalid.
    """
    tokens = tokenize_record(record, tokenizer, spec.template, spec.num_image_tokens, spec.max_length,
                             spec.record_policy)
    image = encode_image(image_bytes or b"", spec) if record.get("image") else None
    return {
        "id": str(record.get("id")),
        "input_ids": tokens.input_ids,
        "labels": tokens.labels,
        "length": tokens.length,
        "has_image": image is not None,
        "image": image,
    }


def encode_image(image_bytes: bytes, spec: SampleSpec) -> np.ndarray:
    """Decode, square and resize one image to uint8 HWC at the vision tower's size.

    Raises:
        RecordError: the bytes are empty, not an image, truncated, or over a size limit (pixels, the
            padded square, the aspect ratio).
    """
    return spec.image.prepare(image_bytes, spec.max_image_pixels, spec.max_image_aspect_ratio)


@dataclass
class LlavaCollator:
    """Pad token sequences (right) and normalise images into a model batch.

    Samples without an image contribute no ``pixel_values`` row: HF LLaVA matches image features to
    ``<image>`` tokens in order, so only the images actually present are stacked. An image is a uint8
    HWC array, or the raw bytes of one as stored in prepared shards (then ``image_size`` is needed).
    """

    pad_token_id: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    image_size: int | None = None

    def _image(self, value: Any) -> np.ndarray:
        if isinstance(value, (bytes, bytearray, memoryview)):
            if self.image_size is None:
                raise ValueError("images given as bytes need LlavaCollator(image_size=...)")
            return np.frombuffer(value, dtype=np.uint8).reshape(self.image_size, self.image_size, 3)
        return np.asarray(value, dtype=np.uint8)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        n = len(samples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, s in enumerate(samples):
            k = len(s["input_ids"])
            input_ids[i, :k] = torch.as_tensor(np.asarray(s["input_ids"]), dtype=torch.long)
            labels[i, :k] = torch.as_tensor(np.asarray(s["labels"]), dtype=torch.long)
            attention[i, :k] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        images = [self._image(s["image"]) for s in samples if s.get("image") is not None]
        if images:
            batch["pixel_values"] = normalize(np.stack(images), self.image_mean, self.image_std)
        return batch

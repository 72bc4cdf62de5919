"""Image decoding and the geometric transforms LLaVA applies before the vision tower.

Images are stored as uint8 HWC arrays after these steps (small, exact, cheap to move through Ray
Data); the float normalisation (CLIP mean/std) happens in the training collate.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from llava_platform.config.schema import MAX_IMAGE_ASPECT_RATIO as MAX_ASPECT_RATIO
from llava_platform.config.schema import AspectRatio
from llava_platform.errors import RecordError

# OpenAI CLIP's pixel statistics: the image processor's mean/std when a vision tower ships none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_size(w: int, h: int, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
    """Refuse, from the header's size alone, an image whose decoding or squaring would cost too
    much: over ``max_pixels``; thinner than ``1:max_aspect_ratio``; or whose padded square
    (``max(w, h)**2``, what LLaVA's ``pad`` builds before resizing) is over ``max_pixels``.

    Raises:
        RecordError: ``zero_size_image``, ``image_too_large`` or ``image_aspect_ratio``.
    """
    if w <= 0 or h <= 0:
        raise RecordError("zero_size_image", f"image is {w}x{h}")
    if w * h > max_pixels:
        raise RecordError("image_too_large", f"{w}x{h} = {w * h} pixels, over the limit {max_pixels}")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise RecordError("image_aspect_ratio", f"{w}x{h} is more than {max_aspect_ratio:g} times longer one way "
                          "than the other (the limit on the aspect ratio)")
    side = max(w, h)
    if side * side > max_pixels:
        raise RecordError("image_too_large", f"{w}x{h} padded to a square is {side}x{side} = {side * side} pixels, "
                          f"over the limit {max_pixels}")


@dataclass(frozen=True)
class Decoding:
    """How decoded pixels become RGB (see :func:`to_rgb`). The default is LLaVA's
    ``Image.open(f).convert("RGB")``: no EXIF rotation, alpha dropped."""

    exif_transpose: bool = False
    alpha_background: tuple[int, int, int] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Decoding":
        """From a config section with ``image_exif_transpose`` and ``image_alpha_background``."""
        bg = cfg.image_alpha_background
        return cls(cfg.image_exif_transpose, tuple(bg) if bg is not None else None)  # type: ignore[arg-type]


def decode(data: bytes, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO,
           decoding: Decoding = Decoding()) -> Image.Image:
    """Decode image bytes into an RGB Pillow image, fully loaded, after :func:`check_size` passed
    on the header's size (nothing is decoded before); ``decoding`` says how (LLaVA's by default).

    Raises:
        RecordError: ``zero_size_image``, ``image_too_large`` (pixel limit; decompression bombs; the
            padded square), ``image_aspect_ratio`` or ``undecodable_image`` (not an image,
            truncated, corrupt).
    """
    if not data:
        raise RecordError("zero_size_image", "the image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_size(*img.size, max_pixels, max_aspect_ratio)
            img.load()
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RecordError("image_too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:  # its message names an in-memory buffer; the file's bytes stay out
        raise RecordError("undecodable_image", f"not a known image format ({len(data)} bytes)") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for bad/truncated data
        raise RecordError("undecodable_image", f"{type(e).__name__}: {e}") from e
    return to_rgb(img, decoding.alpha_background, decoding.exif_transpose)


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None,
           exif_transpose: bool = False) -> Image.Image:
    """Normalise any Pillow mode to RGB as Pillow's ``convert("RGB")`` does (LLaVA's decoding: the
    stored orientation, colour kept under transparent pixels), with two options: rotate by the EXIF
    orientation tag; composite transparency over ``background``. 16/32-bit greyscale is scaled to
    8 bits (``convert`` would clip it to white; LLaVA's datasets hold none)."""
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if img.mode.startswith("I;16") or hi > 255 else max(hi, 1.0))
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if background is None:
        return img.convert("RGB") if img.mode != "RGB" else img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically with ``fill`` (LLaVA-1.5's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The fill for ``pad``: LLaVA's ``expand2square`` colour, ``int(m * 255)`` per channel
    (truncated, not rounded: (122, 116, 104) for CLIP's mean)."""
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


def prepare_image(img: Image.Image, size: int, aspect_ratio: AspectRatio, mean: Sequence[float]) -> np.ndarray:
    """Square, resize to the vision tower's ``size`` (bicubic, as CLIP), return uint8 HWC.

    ``pad`` fills with the processor's mean colour (LLaVA-1.5's stage 2); ``crop`` resizes the short
    side to ``size`` and takes the centre square, as CLIP's image processor does (LLaVA's default,
    ``image_aspect_ratio`` unset, as LLaVA-1.5's stage 1 runs); ``resize`` squashes the whole image.
    """
    if aspect_ratio == "pad":
        img = expand_to_square(img, pad_colour(mean))
    elif aspect_ratio == "crop":
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)  # CLIPImageProcessor's shortest_edge rule (truncated)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif aspect_ratio != "resize":
        raise ValueError(f"unknown image_aspect_ratio {aspect_ratio!r}; choose pad, resize or crop")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC -> float32 NCHW tensor scaled to [0, 1] and standardised (what CLIP's processor does)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 1, 1, 3)) / torch.tensor(std).view(1, 1, 1, 3)
    return x.permute(0, 3, 1, 2).contiguous()


def num_image_tokens(config: Any) -> int:
    """Image features per image (a ``LlavaConfig``) = ``<image>`` tokens in the expanded prompt."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes vision-tower input: the tower's size, the processor's mean/std, the
    aspect-ratio handling used in training, and how many embeddings the projector yields."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_tokens: int
    aspect_ratio: AspectRatio = "pad"
    decoding: Decoding = Decoding()

    @classmethod
    def from_model(cls, config: Any, processor: Any, aspect_ratio: AspectRatio = "pad",
                   decoding: Decoding = Decoding()) -> "ImageSpec":
        ip = processor.image_processor
        return cls(config.vision_config.image_size, tuple(ip.image_mean), tuple(ip.image_std),  # type: ignore[arg-type]
                   num_image_tokens(config), aspect_ratio, decoding)

    def prepare(self, data: bytes, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> np.ndarray:
        """Decode and square/resize image bytes to uint8 HWC, as the training pipeline does.

        Raises:
            RecordError: empty, undecodable, truncated, or over a size limit (see ``check_size``).
        """
        img = decode(data, max_pixels, max_aspect_ratio, self.decoding)
        return prepare_image(img, self.size, self.aspect_ratio, self.mean)

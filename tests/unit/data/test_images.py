import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from llava_platform.data.images import Decoding, decode, expand_to_square, normalize, pad_colour, prepare_image, to_rgb
from llava_platform.errors import RecordError
from llava_platform.data.images import CLIP_MEAN, CLIP_STD
from llava_platform.model.components import default_image_processor


def png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_by_default_transparency_is_dropped_as_llavas_convert_rgb_does():
    # LLaVA (train.py LazySupervisedDataset, mm_utils.load_image*): Image.open(f).convert('RGB').
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 0, 0) and out.getpixel((0, 0)) == (0, 0, 255)
    assert to_rgb(Image.new("LA", (2, 2), (200, 0))).getpixel((0, 0)) == (200, 200, 200)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    assert to_rgb(p).getpixel((0, 0)) == (255, 0, 0)
    decoded = decode(png(img), 10**6)
    assert list(decoded.getdata()) == list(img.convert("RGB").getdata())


def test_rgba_composited_over_background_when_asked():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = to_rgb(img, background=(10, 20, 30))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (10, 20, 30) and out.getpixel((0, 0)) == (0, 0, 255)
    decoded = decode(png(img), 10**6, decoding=Decoding(alpha_background=(10, 20, 30)))
    assert decoded.getpixel((1, 1)) == (10, 20, 30)


def test_la_and_palette_with_transparency_composited_when_asked():
    white = (255, 255, 255)
    la = Image.new("LA", (2, 2), (200, 0))
    assert to_rgb(la, white).getpixel((0, 0)) == white
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    assert to_rgb(p, white).getpixel((0, 0)) == white
    p2 = Image.new("P", (2, 2), 1)
    p2.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert to_rgb(p2, white).getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_greyscale_and_16_bit():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    i16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(i16).getpixel((0, 0)) == (255, 255, 255)
    half = decode(png(Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))), 10**6)
    assert half.mode == "RGB" and 127 <= half.getpixel((0, 0))[0] <= 129


def test_exif_orientation_is_kept_as_stored_unless_asked():
    # LLaVA does not rotate: mix665k's box coordinates refer to the stored orientation.
    img = Image.new("RGB", (4, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = png(img, fmt="JPEG", exif=exif.tobytes())
    assert decode(data, 10**6).size == (4, 2)
    assert decode(data, 10**6, decoding=Decoding(exif_transpose=True)).size == (2, 4)


def test_decoding_options_come_from_the_config_and_a_bad_colour_names_the_field():
    from pydantic import ValidationError

    from llava_platform.config.schema import DataConfig, EvalConfig, ServeConfig

    assert Decoding.from_config(DataConfig(data_path="x")) == Decoding()
    cfg = ServeConfig(model="m", image_exif_transpose=True, image_alpha_background=[255, 255, 255])
    assert Decoding.from_config(cfg) == Decoding(True, (255, 255, 255))
    assert Decoding.from_config(EvalConfig(questions="q", image_root="r", output_dir="o")) == Decoding()
    with pytest.raises(ValidationError, match="image_alpha_background"):
        DataConfig(data_path="x", image_alpha_background=[0, 0, 300])


def test_pad_to_square_with_mean_colour():
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    sq = expand_to_square(img, (1, 2, 3))
    assert sq.size == (8, 8) and sq.getpixel((0, 0)) == (1, 2, 3) and sq.getpixel((0, 3)) == (255, 0, 0)
    arr = prepare_image(img, 16, "pad", CLIP_MEAN)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    # LLaVA's expand2square fill, tuple(int(x * 255) for x in image_mean): truncated, not rounded.
    assert tuple(arr[0, 0]) == pad_colour(CLIP_MEAN) == (122, 116, 104)


def test_crop_is_clips_processor_pixel_for_pixel():
    # LLaVA without --image_aspect_ratio (pretrain.sh, stage 1): processor.preprocess(image), i.e.
    # CLIP's shortest-edge resize then centre crop; noise images show any interpolation difference.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 do_rescale=False, do_normalize=False)
    rng = np.random.default_rng(0)
    for w, h in [(57, 40), (40, 57), (100, 33), (31, 50), (64, 64)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = clip(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.array_equal(prepare_image(img, 32, "crop", CLIP_MEAN), ref), (w, h)


def test_crop_and_resize_modes():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red band on the left quarter
    crop = prepare_image(img, 10, "crop", CLIP_MEAN)
    squash = prepare_image(img, 10, "resize", CLIP_MEAN)
    assert crop.shape == squash.shape == (10, 10, 3)
    assert crop[5, 0, 0] < 50  # the centre crop loses the red band
    assert squash[5, 0, 0] > 200  # squashing keeps it
    with pytest.raises(ValueError, match="unknown image_aspect_ratio"):
        prepare_image(img, 10, "stretch", CLIP_MEAN)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "zero_size_image"),
        (b"this is not an image", "undecodable_image"),
    ],
)
def test_decode_errors(data, reason):
    with pytest.raises(RecordError) as e:
        decode(data, 10**6)
    assert e.value.reason == reason


def test_an_unknown_format_is_refused_without_quoting_the_files_bytes():
    # Reject details land in rejects.jsonl and API errors: a file's content never does.
    with pytest.raises(RecordError) as e:
        decode(b"root:x:0:0:root:/root:/bin/bash\n", 10**6)
    assert e.value.detail == "not a known image format (32 bytes)"


def test_truncated_image():
    data = png(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(RecordError) as e:
        decode(data[: len(data) // 2], 10**6)
    assert e.value.reason == "undecodable_image"


def test_pixel_limit_guards_decompression_bombs():
    data = png(Image.new("RGB", (300, 300)))
    with pytest.raises(RecordError) as e:
        decode(data, max_pixels=300 * 300 - 1)
    assert e.value.reason == "image_too_large"
    assert decode(data, max_pixels=300 * 300).size == (300, 300)


def test_normalize_matches_clip_processor():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    ours = normalize(arr, CLIP_MEAN, CLIP_STD)
    ref = default_image_processor(32)([Image.fromarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_a_thin_image_is_refused_from_its_header_before_it_is_decoded_or_padded(monkeypatch):
    # 1x100000 is 100000 pixels (under the limit) in a ~500-byte PNG, but padding it to a square
    # would ask for 100000**2 * 3 bytes (30 GB).
    thin = png(Image.new("RGB", (1, 100_000)))
    assert len(thin) < 1000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or None)
    with pytest.raises(RecordError) as e:
        decode(thin, max_pixels=50_000_000)
    assert e.value.reason == "image_aspect_ratio" and "1x100000" in e.value.detail
    with pytest.raises(RecordError) as e:  # allowed thin, the padded square still bounds the work
        decode(thin, max_pixels=50_000_000, max_aspect_ratio=10**6)
    assert e.value.reason == "image_too_large" and "100000x100000" in e.value.detail
    assert loads == []  # refused from the header: nothing was decoded


def test_aspect_ratio_and_square_limits_accept_what_is_within_them():
    img = decode(png(Image.new("RGB", (200, 10))), max_pixels=200 * 200)  # 20:1, square 40000
    assert img.size == (200, 10)
    with pytest.raises(RecordError, match="21 times|more than 20"):
        decode(png(Image.new("RGB", (210, 10))), max_pixels=10**6)
    with pytest.raises(RecordError, match="padded to a square"):
        decode(png(Image.new("RGB", (200, 10))), max_pixels=200 * 200 - 1)

"""Each bad image kind gets its own error; valid odd modes decode to the right RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from models.decode import DecodeLimits, ImageDecodeError, decode_image, image_ext, image_media_type, sniff_format


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, seed=0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _code(data, **kw) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, **kw)
    return ei.value.code


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_allowed_formats_decode_to_rgb(fmt):
    out = decode_image(_enc(_rgb(), fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_empty_and_random_bytes():
    assert _code(b"") == "empty"
    assert _code(np.random.default_rng(1).bytes(500)) == "undecodable"


def test_truncated_jpeg():
    data = _enc(_rgb(200, 200), "JPEG", quality=90)
    assert _code(data[: len(data) // 2]) == "truncated"


@pytest.mark.parametrize("magic,name", [(b"%!PS-Adobe-3.0 EPSF-3.0\n", "EPS"), (b"II*\x00", "TIFF"), (b"8BPS\x00\x01", "PSD")])
def test_disallowed_formats_by_content_not_name(tmp_path, magic, name):
    f = tmp_path / "photo.jpg"
    f.write_bytes(magic + b"\x00" * 200)
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(f)
    assert ei.value.code == "unsupported_format"
    assert name in str(ei.value) and str(f) in str(ei.value)


def test_real_tiff_refused():
    assert _code(_enc(_rgb(), "TIFF")) == "unsupported_format"


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (a decompression bomb's header)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_pixel_bomb_and_side_limits():
    assert _code(_png_header_only(9000, 9000)) == "too_many_pixels"  # 81 Mpx > 40 Mpx
    assert _code(_png_header_only(8193, 10)) == "too_many_pixels"  # side > 8192
    assert _code(_enc(_rgb(50, 50), "PNG"), limits=DecodeLimits(max_pixels=100)) == "too_many_pixels"


def test_full_decode_pixel_limit_spares_jpeg():
    """PNG, WebP and GIF cannot decode at a reduced scale: their own pixel cap; a JPEG obeys max_pixels."""
    limits = DecodeLimits(max_full_pixels=50 * 40 - 1)
    for fmt in ("PNG", "WEBP", "GIF"):
        assert _code(_enc(_rgb(50, 40), fmt), limits=limits) == "too_many_pixels", fmt
    assert decode_image(_enc(_rgb(50, 40), "JPEG"), limits=limits).size == (50, 40)
    assert decode_image(_enc(_rgb(50, 40), "PNG"), limits=DecodeLimits(max_full_pixels=50 * 40)).size == (50, 40)


def test_byte_limit():
    assert _code(_enc(_rgb(100, 100), "PNG"), limits=DecodeLimits(max_bytes=100)) == "too_large"


def test_one_pixel_image_decodes():
    assert decode_image(_enc(_rgb(1, 1), "PNG")).size == (1, 1)


def test_16bit_png_scaled_not_clipped():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    out = np.asarray(decode_image(_enc(Image.fromarray(arr), "PNG")))
    assert out.dtype == np.uint8 and out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    mid = np.full((4, 4), 32768, dtype=np.uint16)
    assert 126 <= np.asarray(decode_image(_enc(Image.fromarray(mid), "PNG")))[0, 0, 0] <= 129


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_enc(cmyk, "JPEG", quality=95)))
    r, g, b = out[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_composited_on_white():
    p = Image.new("P", (10, 10), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (5, 0, 10, 10))
    data = _enc(p, "PNG", transparency=0)
    out = np.asarray(decode_image(data))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert out[0, 9].tolist() == [0, 0, 255]


def test_rgba_alpha_composited():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(_enc(im, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


def test_exif_rotation_equals_upright_twin():
    upright = _rgb(40, 20, seed=3)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera stores it; orientation 6 = rotate 270 to view
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(_enc(stored, "JPEG", quality=100, exif=exif.tobytes()))
    twin = decode_image(_enc(upright, "JPEG", quality=100))
    assert rotated.size == twin.size == (40, 20)
    assert np.abs(np.asarray(rotated, np.int16) - np.asarray(twin, np.int16)).mean() < 6


def test_grey_and_la_modes():
    assert decode_image(_enc(Image.new("L", (5, 5), 7), "PNG")).getpixel((0, 0)) == (7, 7, 7)
    assert decode_image(_enc(Image.new("LA", (5, 5), (7, 255)), "PNG")).getpixel((0, 0)) == (7, 7, 7)


def test_unreadable_path_names_file(tmp_path):
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(tmp_path / "missing.jpg")
    assert ei.value.code == "unreadable" and "missing.jpg" in str(ei.value)


def test_draft_never_below_requested():
    img = decode_image(_enc(_rgb(800, 600), "JPEG"), draft_size=(128, 128))
    assert min(img.size) >= 128 and img.size[0] < 800


def test_garbage_after_jpeg_magic_is_undecodable_not_internal_error(caplog):
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(b"\xff\xd8\xff" + b"garbage" * 50)
    assert ei.value.code in ("undecodable", "truncated")
    assert "KeyError" not in str(ei.value) and "unexpected decoder failure" not in caplog.text


def test_mpo_camera_jpeg_first_frame():
    a, b = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 255, 0))
    buf = io.BytesIO()
    a.save(buf, "MPO", save_all=True, append_images=[b])
    im = decode_image(buf.getvalue())
    assert im.size == (20, 10) and im.getpixel((0, 0))[0] > 240


# ---------------------------------------------------------------------------- format sniffing

def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,ext,media", [("JPEG", "jpg", "image/jpeg"), ("PNG", "png", "image/png"),
                                           ("WEBP", "webp", "image/webp"), ("GIF", "gif", "image/gif")])
def test_each_format_has_its_own_extension_and_media_type(fmt, ext, media):
    data = _encoded(fmt)
    assert sniff_format(data) == fmt
    assert image_ext(data) == ext
    assert image_media_type(data[:16]) == media


@pytest.mark.parametrize("head", [b"GIF87a" + b"\0" * 10, b"GIF89a" + b"\0" * 10])
def test_both_gif_versions_are_gif(head):
    assert image_media_type(head) == "image/gif"


@pytest.mark.parametrize("head", [b"RIFF\0\0\0\0WAVEfmt ", b"RIFX\0\0\0\0WEBPVP8 ", b"GIF90a", b"\x89PNG\r\n",
                                  b"\xff\xd8", b"BM" + b"\0" * 14, b""])
def test_other_bytes_have_no_format(head):
    assert sniff_format(head) is None
    assert image_media_type(head) is None
    with pytest.raises(ValueError, match="not a JPEG, PNG, WebP or GIF"):
        image_ext(head)

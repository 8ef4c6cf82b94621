"""load_image: EXIF orientation, mode conversion, size limit before decoding, broken files."""

from __future__ import annotations

import importlib.util
import random
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from glmtune.data.images import image_size, load_image, pad_to_aspect_ratio, to_rgb
from glmtune.data.sample import SampleError

ROOT = Path(__file__).resolve().parents[2]


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def noise_png(path: Path, size: int = 64) -> None:
    # Random pixels so that the compressed data is long enough to cut in the middle.
    Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3)).save(path)


def error_of(path, source="d.jsonl:7", **kw) -> str:
    with pytest.raises(SampleError) as e:
        load_image(path, source, **kw)
    assert e.value.source == source
    return str(e.value)


# --- good images --------------------------------------------------------------------------------------


def test_rgb_png_loads_unchanged(tmp_path):
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    image.putpixel((4, 2), (200, 100, 0))
    image.save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png", "s:1")
    assert got.mode == "RGB" and got.size == (5, 3)
    assert got.getpixel((0, 0)) == (10, 20, 30) and got.getpixel((4, 2)) == (200, 100, 0)
    assert got.copy().getpixel((4, 2)) == (200, 100, 0)  # usable after the file was closed


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored 40x20: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display", so the upright image is 20x40 with red on top.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    got = load_image(tmp_path / "r.jpg", "s:1")
    assert got.size == (20, 40)
    top, bottom = got.getpixel((10, 5)), got.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert image_size(tmp_path / "r.jpg", "s:1") == (20, 40)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black -> white
    image.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    image.putpixel((2, 0), (0, 0, 255, 128))  # half-transparent blue -> light blue
    image.save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png", "s:1")
    assert got.mode == "RGB"
    assert got.getpixel((0, 0)) == (255, 255, 255)
    assert got.getpixel((1, 0)) == (255, 0, 0)
    assert got.getpixel((2, 0)) == (127, 127, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    got = load_image(tmp_path / "p.png", "s:1")
    assert got.mode == "RGB" and [got.getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (0, 255, 0)]


@pytest.mark.parametrize(
    "mode, value, suffix, expected",
    [
        ("L", 77, ".png", (77, 77, 77)),
        ("LA", (77, 255), ".png", (77, 77, 77)),
        ("P", 0, ".png", (0, 0, 0)),
        ("1", 1, ".png", (255, 255, 255)),
        ("I;16", 40000, ".png", (156, 156, 156)),  # 40000 / 256, not clipped to white
        ("CMYK", (0, 255, 255, 0), ".jpg", (255, 0, 0)),  # red in CMYK
    ],
)
def test_modes_come_out_rgb(tmp_path, mode, value, suffix, expected):
    image = Image.new(mode, (4, 4), value)
    path = tmp_path / f"img{suffix}"
    image.save(path, quality=100) if suffix == ".jpg" else image.save(path)
    got = load_image(path, "s:1")
    assert got.mode == "RGB" and got.size == (4, 4)
    pixel = got.getpixel((3, 3))
    if suffix == ".jpg":
        assert all(abs(a - b) <= 3 for a, b in zip(pixel, expected)), pixel
    else:
        assert pixel == expected


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    image = Image.new("I;16", (3, 1))
    for x, v in enumerate((65535, 32768, 200)):
        image.putpixel((x, 0), v)
    image.save(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png", "s:1")
    assert [got.getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (128,) * 3, (0,) * 3]


def test_to_rgb_keeps_8bit_values_in_32bit_integer_images():
    assert to_rgb(Image.new("I", (1, 1), 200)).getpixel((0, 0)) == (200, 200, 200)


def test_bundled_sample_images_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_format_samples", ROOT / "scripts" / "make_format_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fmt, names in module.IMAGES.items():
        for name in names:
            path = ROOT / "data_formats" / fmt / "images" / f"{name}.png"
            assert path.stat().st_size < 1000
            got = load_image(path, "s:1")
            assert got.tobytes() == module.draw(name).tobytes(), path


# --- size limit --------------------------------------------------------------------------------------


def test_huge_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    png_header_only(path, 100_000, 100_000)
    # If the pixels were decoded we would get a truncation error (or run out of memory) instead.
    assert error_of(path) == (
        f"d.jsonl:7: cannot read image {path}: 100000x100000 = 10000000000 pixels "
        "is over the limit of 64000000"
    )
    assert image_size(path, "s:1") == (100_000, 100_000)


def test_max_pixels_is_inclusive(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", "s:1", max_pixels=64 * 64).size == (64, 64)
    assert error_of(tmp_path / "a.png", max_pixels=64 * 64 - 1).endswith(
        "64x64 = 4096 pixels is over the limit of 4095"
    )


def test_only_our_limit_applies_and_pil_global_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 32x32 (> 2 x 100)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", "s:1").getpixel((0, 0)) == (1, 2, 3)
    assert Image.MAX_IMAGE_PIXELS == 100
    (tmp_path / "bad.png").write_bytes(b"garbage")
    error_of(tmp_path / "bad.png")
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):  # PIL's own check is back outside our function
        Image.open(tmp_path / "a.png")


def test_concurrent_loads_restore_pil_global(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    errors = []

    def work():
        try:
            for _ in range(50):
                load_image(tmp_path / "a.png", "s:1")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and Image.MAX_IMAGE_PIXELS == 12345


# --- broken files ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    assert error_of(path) == f"d.jsonl:7: cannot read image {path}: file not found"


def test_garbage_bytes(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"<html>this is not a png</html>")
    assert error_of(path) == f"d.jsonl:7: cannot read image {path}: not an image file (or a format PIL cannot read)"


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    noise_png(path)
    data = path.read_bytes()
    assert len(data) > 4000
    path.write_bytes(data[: len(data) // 2])
    message = error_of(path)
    assert message.startswith(f"d.jsonl:7: cannot read image {path}: OSError: "), message
    assert "truncated" in message or "broken" in message, message


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    noise_png(tmp_path / "n.png")
    Image.open(tmp_path / "n.png").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert error_of(path).startswith(f"d.jsonl:7: cannot read image {path}: OSError: image file is truncated")


def test_directory_is_not_an_image(tmp_path):
    assert error_of(tmp_path) == f"d.jsonl:7: cannot read image {tmp_path}: it is a folder, not an image file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert error_of(path) == f"d.jsonl:7: cannot read image {path}: the file is empty (0 bytes)"


# --- animated formats, paths, shapes ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_gives_its_first_frame(tmp_path, suffix):
    path = tmp_path / f"anim{suffix}"
    frames = [Image.new("RGB", (16, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    assert Image.open(path).n_frames == 3
    image = load_image(path, "d.jsonl:1")
    assert image.mode == "RGB" and image.size == (16, 8)
    assert image.getpixel((3, 3)) == (255, 0, 0)  # first frame, exactly (GIF palette and lossless WebP)


def test_non_ascii_path(tmp_path):
    folder = tmp_path / "图片 données"
    folder.mkdir()
    path = folder / "猫 chat é.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    assert load_image(path, "d.jsonl:1").getpixel((0, 0)) == (1, 2, 3)
    empty = folder / "空.png"
    empty.write_bytes(b"")
    assert error_of(empty) == f"d.jsonl:7: cannot read image {empty}: the file is empty (0 bytes)"


@pytest.mark.parametrize("size, expected", [((1, 2000), (11, 2000)), ((2000, 3), (2000, 11)), ((100, 100), (100, 100)),
                                            ((1, 190), (1, 190))])
def test_pad_to_aspect_ratio(size, expected):
    image = Image.new("RGB", size, (255, 0, 0))
    padded = pad_to_aspect_ratio(image, 190)
    assert padded.size == expected
    if padded is not image:  # centred on white, every pixel kept
        x, y = (expected[0] - size[0]) // 2, (expected[1] - size[1]) // 2
        assert padded.getpixel((x, y)) == (255, 0, 0) and padded.getpixel((0, 0)) == (255, 255, 255)
        assert padded.crop((x, y, x + size[0], y + size[1])).tobytes() == image.tobytes()

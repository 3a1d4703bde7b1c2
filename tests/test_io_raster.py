"""PNG and TIFF radiographs: 8 and 16 bit (and float TIFF) in and out, pixel spacing read and written where the
format carries it, colour and multi-page files refused."""

from __future__ import annotations

import numpy as np
import pytest
from io_fixtures import smooth_image
from PIL import Image

from medsr.errors import InputError
from medsr.io.affine import upsample_affine
from medsr.io.dtypes import resolve_dtype
from medsr.io.raster import load_raster, save_raster


def _pixels(dtype) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4095
    return np.round(smooth_image((12, 10)) / 1000 * top).astype(dtype)


@pytest.mark.parametrize(
    ("name", "dtype", "options", "spacing"),
    [
        ("a.png", np.uint8, {}, None),  # no pHYs chunk
        ("b.png", np.uint16, {"dpi": (25.4 / 0.2, 25.4 / 0.1)}, (0.1, 0.2)),  # pHYs (x, y) in pixels per metre
        ("c.tif", np.uint8, {}, None),  # no resolution tags
        ("d.tif", np.uint16, {"resolution_unit": 3, "x_resolution": 50.0, "y_resolution": 40.0}, (0.25, 0.2)),  # cm
        ("e.tiff", np.float32, {"dpi": (254.0, 254.0)}, (0.1, 0.1)),  # inch
    ],
)
def test_raster_round_trip_keeps_values_and_scales_the_spacing(tmp_path, name, dtype, options, spacing):
    pixels = _pixels(dtype)
    Image.fromarray(pixels).save(tmp_path / name, **options)
    volume = load_raster(tmp_path / name)
    assert volume.data.shape == (10, 12, 1) and volume.stored_dtype == np.dtype(dtype) and volume.is_2d
    np.testing.assert_array_equal(volume.data[:, :, 0].T, pixels)
    expected = (1.0, 1.0) if spacing is None else (spacing[1], spacing[0])
    assert volume.zooms[:2] == pytest.approx(expected, rel=1e-4)
    assert bool(volume.notes) == (spacing is None)
    out = tmp_path / f"sr_{name}"
    affine = upsample_affine(volume.affine, [4, 4, 1])
    data = np.repeat(np.repeat(volume.data, 4, axis=0), 4, axis=1)
    fmt = "png" if name.endswith("png") else "tiff"
    save_raster(out, data, affine, volume, fmt, resolve_dtype("input", fmt, volume))
    again = load_raster(out)
    np.testing.assert_array_equal(again.data, data)
    if spacing is None:
        assert again.notes  # no spacing invented
    else:
        assert again.zooms[:2] == pytest.approx((expected[0] / 4, expected[1] / 4), rel=1e-4)


def test_float_output_only_where_the_format_holds_it(tmp_path):
    Image.fromarray(_pixels(np.uint16)).save(tmp_path / "x.png")
    volume = load_raster(tmp_path / "x.png")
    assert resolve_dtype("auto", "png", volume) == np.uint16  # PNG has integers only: the input's type
    assert resolve_dtype("auto", "tiff", volume) == np.float32
    assert resolve_dtype("auto", "nifti", volume) == np.float32
    with pytest.raises(InputError, match="PNG output cannot hold float32"):
        resolve_dtype("float32", "png", volume)


def test_eight_bit_output_clips_and_counts(tmp_path):
    Image.fromarray(_pixels(np.uint8)).save(tmp_path / "x.png")
    volume = load_raster(tmp_path / "x.png")
    data = volume.data.copy()
    data[0, 0, 0], data[1, 0, 0] = -3.0, 300.0
    clipped = save_raster(tmp_path / "y.png", data, volume.affine, volume, "png", np.dtype(np.uint8))
    assert clipped == pytest.approx(2 / data.size)
    stored = np.asarray(Image.open(tmp_path / "y.png"))
    assert stored[0, 0] == 0 and stored[0, 1] == 255


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: Image.new("RGB", (8, 8)).save(p), "RGB image; medsr reads grayscale"),
        (lambda p: Image.new("P", (8, 8)).save(p), "P image"),
        (
            lambda p: Image.new("L", (8, 8)).save(p, save_all=True, append_images=[Image.new("L", (8, 8))]),
            "multi-page file",
        ),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30), "unreadable or corrupt"),
    ],
)
def test_unusable_rasters_are_refused_by_name(tmp_path, make, message):
    path = tmp_path / ("x.tif" if "multi" in message else "x.png")
    make(path)
    with pytest.raises(InputError, match=message) as info:
        load_raster(path)
    assert str(path) in str(info.value)

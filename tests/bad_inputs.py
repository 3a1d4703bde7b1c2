"""A corpus of bad inputs for medsr-infer, generated (never downloaded): every case is a command line that must end
in one clear line naming the file and the problem, exit code 1, no output or temporary file, inputs untouched.

``build_corpus(root, bundle)`` writes the inputs under ``root/in`` (real DICOM headers from pydicom's CT5N and
pydicom-data's RG1_UNCR where DICOM is needed) and returns the cases; outputs are aimed at ``root/out``.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from io_fixtures import copy_series, radiograph_crop, smooth_image, write_nifti, write_series
from PIL import Image


@dataclass(frozen=True)
class BadCase:
    """``args`` for medsr-infer (``--model`` is added by the test unless ``own_model``); the one output line must
    contain ``expect`` and, when given, ``names`` (the file the problem is about)."""

    name: str
    args: list[str]
    expect: str
    names: str | None
    own_model: bool = False
    extra: list[str] = field(default_factory=list)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height and whose data is absent: only a header-first reader survives it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    data = zlib.compress(b"\0" * 64)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + idat)
    return path


def _nifti_header_only(path: Path, shape, dtype=np.float32) -> Path:
    """A .nii holding only the header of an image of ``shape``: it claims far more voxels than it holds."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4)
    return path


def _truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _dicom_files(root: Path) -> list[BadCase]:
    inp = root / "in"
    cases = []
    garbage = inp / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    cases.append(BadCase("dicom_garbage", [str(garbage)], "not a DICOM file", str(garbage)))
    (inp / "empty.dcm").write_bytes(b"")
    cases.append(BadCase("dicom_empty", [str(inp / "empty.dcm")], "file is empty", str(inp / "empty.dcm")))
    truncated = copy_series(inp / "ct_truncated")
    _truncate(sorted(truncated.iterdir())[2], 0.7)
    cases.append(BadCase("dicom_truncated", [str(truncated)], "no pixel data after the header (a truncated", "2693"))
    (inp / "no_images").mkdir()
    (inp / "no_images" / "README.dcm").write_bytes(b"not an image")
    cases.append(BadCase("dicom_dir_without_images", [str(inp / "no_images")], "not a DICOM file", "README.dcm"))
    two = write_series(inp / "two_series", [(0, 0, z) for z in range(3)], uid="1.2.826.0.1.1")
    write_series(two, [(0, 0, z) for z in range(2)], uid="1.2.826.0.1.2", prefix="b")
    cases.append(BadCase("dicom_two_series", [str(two)], "holds 2 DICOM series; choose one with --series", str(two)))
    uneven = write_series(inp / "uneven", [(0, 0, 0), (0, 0, 1), (0, 0, 3)])
    cases.append(BadCase("dicom_uneven_spacing", [str(uneven)], "not evenly spaced", str(uneven)))
    repeated = write_series(inp / "repeated", [(0, 0, 0), (0, 0, 0), (0, 0, 1)])
    cases.append(BadCase("dicom_repeated_positions", [str(repeated)], "same position", str(repeated)))

    def shrink_last(ds, k):
        if k == 2:
            ds.Rows = ds.Columns = 8
            ds.PixelData = np.zeros((8, 8), np.int16).tobytes()

    mixed = write_series(inp / "mixed_sizes", [(0, 0, z) for z in range(3)], modify=shrink_last)
    cases.append(BadCase("dicom_mixed_sizes", [str(mixed)], "Rows 8 differs", "im002.dcm"))

    def make_rgb(ds, k):
        ds.PhotometricInterpretation = "RGB"

    rgb = write_series(inp / "rgb", [(0, 0, 0)], modify=make_rgb)
    cases.append(BadCase("dicom_rgb", [str(rgb)], "unsupported PhotometricInterpretation 'RGB'", "im000.dcm"))
    single = copy_series(inp / "ct_ok")
    cases.append(
        BadCase(
            "dicom_axis_for_dicom_output",
            [str(single), "--format", "dicom", "--axis", "0", "-o", str(root / "out" / "ct")],
            "--axis must be 2",
            str(single),
        )
    )
    cr = radiograph_crop(inp / "cr.dcm")
    cases.append(
        BadCase(
            "dicom_dtype_for_dicom_output",
            [str(cr), "--format", "dicom", "--dtype", "float32", "-o", str(root / "out" / "cr.dcm")],
            "--dtype float32",
            str(cr),
        )
    )
    return cases


def _nifti_files(root: Path) -> list[BadCase]:
    inp = root / "in"
    good = write_nifti(inp / "good.nii", smooth_image((12, 12, 3)), np.eye(4))
    cases = [
        BadCase("missing_file", [str(inp / "none.nii.gz")], "file not found", str(inp / "none.nii.gz")),
    ]
    (inp / "link.nii").symlink_to(inp / "gone.nii")
    cases.append(BadCase("dangling_symlink", [str(inp / "link.nii")], "file not found", str(inp / "link.nii")))
    (inp / "empty.nii").write_bytes(b"")
    cases.append(BadCase("nifti_empty", [str(inp / "empty.nii")], "file is empty", str(inp / "empty.nii")))
    (inp / "garbage.nii").write_bytes(np.random.default_rng(1).bytes(1000))
    cases.append(BadCase("nifti_garbage", [str(inp / "garbage.nii")], "corrupt NIfTI", str(inp / "garbage.nii")))
    (inp / "garbage.nii.gz").write_bytes(np.random.default_rng(2).bytes(1000))
    cases.append(BadCase("niigz_garbage", [str(inp / "garbage.nii.gz")], "corrupt NIfTI", str(inp / "garbage.nii.gz")))
    truncated = _truncate(write_nifti(inp / "truncated.nii", smooth_image((12, 12, 3)), np.eye(4)), 0.6)
    cases.append(BadCase("nifti_truncated", [str(truncated)], "truncated", str(truncated)))
    gz = inp / "truncated.nii.gz"
    gz.write_bytes(gzip.compress(good.read_bytes())[:-300])
    cases.append(BadCase("niigz_truncated", [str(gz)], "truncated", str(gz)))
    header_only = _nifti_header_only(inp / "header_only.nii", (12, 12, 3))
    cases.append(BadCase("nifti_header_only", [str(header_only)], "truncated", str(header_only)))
    nan = smooth_image((12, 12, 3))
    nan[3, 3, 1] = np.nan
    nan_path = write_nifti(inp / "nan.nii.gz", nan, np.eye(4))
    cases.append(
        BadCase("nifti_nan", [str(nan_path)], "1 voxel(s) are NaN or Inf; pass --repair-nonfinite", str(nan_path))
    )
    inf = smooth_image((12, 12, 3))
    inf[0, 0, 0] = np.inf
    inf_path = write_nifti(inp / "inf.nii", inf, np.eye(4))
    cases.append(BadCase("nifti_inf", [str(inf_path)], "NaN or Inf", str(inf_path)))
    constant = write_nifti(inp / "constant.nii", np.full((12, 12, 3), 7.0), np.eye(4))
    cases.append(BadCase("nifti_constant", [str(constant)], "image is constant", str(constant)))
    complex_path = inp / "complex.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.complex64), np.eye(4)), str(complex_path))
    cases.append(
        BadCase("nifti_complex", [str(complex_path)], "unsupported NIfTI data type complex64", str(complex_path))
    )
    rgb_path = inp / "rgb.nii"
    rgb = np.zeros((8, 8, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(rgb_path))
    cases.append(BadCase("nifti_rgb", [str(rgb_path)], "unsupported NIfTI data type", str(rgb_path)))
    flat = inp / "flat.nii"
    image = nib.Nifti1Image(smooth_image((12, 12, 3)).astype(np.float32), None)
    image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)  # an sform that squashes the third axis
    nib.save(image, str(flat))
    cases.append(BadCase("nifti_singular_affine", [str(flat)], "not a valid voxel-to-world transform", str(flat)))
    huge = _nifti_header_only(inp / "huge.nii", (4000, 4000, 400))
    cases.append(
        BadCase(
            "nifti_too_large_for_limit",
            [str(huge), "--max-memory", "1G"],
            "over the memory limit of 1.0 GiB (--max-memory)",
            str(huge),
        )
    )
    enormous = _nifti_header_only(inp / "enormous.nii", (30000, 30000, 3000), np.int16)
    cases.append(BadCase("nifti_too_large_for_memory", [str(enormous)], "the available memory", str(enormous)))
    line = write_nifti(inp / "line.nii", smooth_image((1, 1, 3)), np.diag([2.0, 2.0, 5.0, 1.0]))
    cases.append(  # the default model takes planes of 2x2 and up: never switch to the 1x3 planes silently
        BadCase(
            "nifti_1x1_planes",
            [str(line), "-o", str(root / "out" / "line.nii.gz")],
            "planes of 1x1 pixels (axis 2 of 1x1x3)",
            str(line),
            own_model=True,
        )
    )
    four_d = write_nifti(inp / "four_d.nii", smooth_image((12, 12, 3, 2)), np.eye(4))
    cases.append(
        BadCase(
            "nifti_frame_out_of_range", [str(four_d), "--frame", "5"], "--frame 5 but the image has shape", str(four_d)
        )
    )
    cases.append(
        BadCase(
            "volume_to_png", [str(good), "-o", str(root / "out" / "x.png")], "PNG output holds one 2D image", str(good)
        )
    )
    cases.append(
        BadCase(
            "dicom_output_from_nifti",
            [str(good), "--format", "dicom", "-o", str(root / "out" / "d")],
            "--format dicom needs a DICOM input",
            str(good),
        )
    )
    cases.append(
        BadCase("series_for_nifti", [str(good), "--series", "3"], "--series applies to DICOM inputs only", str(good))
    )
    cases.append(
        BadCase(
            "suffix_contradicts_format",
            [str(good), "-o", str(root / "out" / "x.png"), "--format", "nifti"],
            "the file name says PNG but --format is nifti",
            "x.png",
        )
    )
    return cases


def _raster_files(root: Path) -> list[BadCase]:
    inp = root / "in"
    cases = []
    (inp / "empty.png").write_bytes(b"")
    cases.append(BadCase("png_empty", [str(inp / "empty.png")], "file is empty", str(inp / "empty.png")))
    (inp / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cases.append(
        BadCase("png_corrupt", [str(inp / "truncated.png")], "unreadable or corrupt PNG", str(inp / "truncated.png"))
    )
    Image.new("RGB", (16, 16)).save(inp / "colour.png")
    cases.append(BadCase("png_rgb", [str(inp / "colour.png")], "RGB image", str(inp / "colour.png")))
    Image.fromarray(np.arange(9, dtype=np.uint8).reshape(3, 3)).save(inp / "tiny.png")
    cases.append(
        BadCase(
            "png_smaller_than_model",
            [str(inp / "tiny.png")],
            "smaller than this model's minimum of 4x4",
            str(inp / "tiny.png"),
        )
    )
    xray = inp / "xray.png"
    Image.fromarray(np.round(smooth_image((16, 16)) * 60).astype(np.uint16)).save(xray)
    cases.append(BadCase("2d_with_frame", [str(xray), "--frame", "0"], "--frame 0 but the image has shape", str(xray)))
    cases.append(
        BadCase(
            "2d_with_axis", [str(xray), "--axis", "0"], "a 2D image of shape (16, 16, 1): --axis must be 2", str(xray)
        )
    )
    cases.append(
        BadCase(
            "png_float_output",
            [str(xray), "--dtype", "float32", "-o", str(root / "out" / "f.png")],
            "PNG output cannot hold float32",
            str(xray),
        )
    )
    float_tiff = inp / "inf.tif"
    values = smooth_image((16, 16)).astype(np.float32)
    values[2, 2] = np.inf
    Image.fromarray(values).save(float_tiff)
    cases.append(BadCase("tiff_inf", [str(float_tiff)], "NaN or Inf", str(float_tiff)))
    giant = _png_header_only(inp / "giant.png", 60000, 60000)
    cases.append(
        BadCase("png_too_large", [str(giant), "--max-memory", "2G"], "over the memory limit of 2.0 GiB", str(giant))
    )
    (inp / "notes.txt").write_text("hello")
    cases.append(BadCase("unknown_type", [str(inp / "notes.txt")], "unknown image type", str(inp / "notes.txt")))
    return cases


def _output_cases(root: Path) -> list[BadCase]:
    inp, out = root / "in", root / "out"
    xray = inp / "xray.png"
    (out / "exists_sr4x.png").write_bytes(b"an earlier result")
    (out / "a_directory").mkdir()
    return [
        BadCase(
            "output_in_missing_directory",
            [str(xray), "-o", str(root / "missing" / "x.png")],
            "output directory",
            str(root / "missing"),
        ),
        BadCase(
            "existing_output",
            [str(xray), "-o", str(out / "exists_sr4x.png")],
            "output exists; pass --overwrite",
            str(out / "exists_sr4x.png"),
        ),
        BadCase(
            "output_is_a_directory",
            [str(xray), "-o", str(out / "a_directory"), "--overwrite"],
            "output path is a directory",
            str(out / "a_directory"),
        ),
        BadCase("bad_tile", [str(xray), "--tile", "30"], "--tile must be a positive multiple of 4", None),
        BadCase("bad_memory_size", [str(xray), "--max-memory", "lots"], "memory size must look like", None),
    ]


def _bundle_cases(root: Path, bundle: Path) -> list[BadCase]:
    xray = root / "in" / "xray.png"
    missing = root / "bundles" / "missing_graph"
    shutil.copytree(bundle, missing)
    (missing / "denoiser.onnx").unlink()
    tampered = root / "bundles" / "tampered"
    shutil.copytree(bundle, tampered)
    graph = tampered / "vae_decoder.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    return [
        BadCase(
            "bundle_missing_graph",
            [str(xray), "--model", str(missing)],
            "graph denoiser is missing",
            str(missing),
            own_model=True,
        ),
        BadCase(
            "bundle_hash_mismatch", [str(xray), "--model", str(tampered)], "sha256 mismatch", str(graph), own_model=True
        ),
        BadCase(
            "bundle_missing",
            [str(xray), "--model", str(root / "nowhere")],
            "bundle directory not found",
            str(root / "nowhere"),
            own_model=True,
        ),
    ]


def build_corpus(root: Path, bundle: Path) -> list[BadCase]:
    """Write the corpus under ``root`` (``in/``, ``out/``, ``bundles/``) and return its cases."""
    for name in ("in", "out", "bundles"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return [
        *_nifti_files(root),
        *_dicom_files(root),
        *_raster_files(root),
        *_output_cases(root),
        *_bundle_cases(root, bundle),
    ]

"""One image preparation: the same file gives the same network input in medsr-train's data path, medsr-eval
fidelity's slices and medsr-infer's planes (intensity window from the bundle or preset, 2D images in display
orientation, MONOCHROME1 inverted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from io_fixtures import StandInPipeline, radiograph_crop, smooth_image, write_nifti
from PIL import Image

pytest.importorskip("torch")

from medsr.bundle import load_bundle
from medsr.cli.train import _setup
from medsr.engine.jobs import InferSettings, prepare_job
from medsr.engine.pipeline import SRResult
from medsr.engine.volume import super_resolve_volume, window_percentiles
from medsr.eval.slices import eval_sources, load_eval_slices
from medsr.io.inputs import Job

#: A paper preset: its bundles declare the window of the published weights, (0, 100) percentiles.
PRESET = "latentsr-medvae-4x1"


class RecordingPipeline(StandInPipeline):
    """Records the planes medsr-infer hands the pipeline, clipped to [-1, 1] as the pipeline clips them for its
    networks, by plane index; returns blank SR planes."""

    def __init__(self, bundle):
        self.bundle, self.planes = bundle, {}

    def super_resolve(self, lr, options, progress=None, first_index=0):
        for offset, plane in enumerate(lr):
            self.planes[first_index + offset] = np.clip(plane, -1.0, 1.0)
        s = self.bundle.scale
        blank = np.zeros((len(lr), s * lr.shape[1], s * lr.shape[2]), np.float32)
        return SRResult(images=blank, residuals=np.zeros(len(lr)))


@pytest.fixture(scope="module")
def paper_window_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle declaring the paper presets' intensity window (0, 100), as a paper bundle does."""
    root = tmp_path_factory.mktemp("bundle") / "paper_window"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "medsr.json").read_text())
    manifest["task"]["intensity"].update(low=0.0, high=100.0)
    (root / "medsr.json").write_text(json.dumps(manifest))
    return root


def _nifti(folder: Path) -> Path:
    """24 x 20 x 6, 1 x 1 x 3 mm (medsr-infer slices along axis 2), with a few bright outliers that a (0.5, 99.5)
    window would clip and a (0, 100) window keeps."""
    data = smooth_image((24, 20, 6))
    data[3, 4, 2] = data[20, 2, 4] = 5000.0
    return write_nifti(folder / "vol.nii.gz", data, np.diag([1.0, 1.0, 3.0, 1.0]))


def _png(folder: Path) -> Path:
    """A 2D image of 40 rows x 56 columns, neither square nor symmetric: a transposed plane cannot pass for it."""
    pixels = np.round(smooth_image((40, 56)) * 60).astype(np.uint16)
    pixels[5, 50] = 65535
    Image.fromarray(pixels).save(folder / "image.png")
    return folder / "image.png"


@pytest.mark.parametrize("make", [_nifti, _png, lambda folder: radiograph_crop(folder / "cr.dcm")])
def test_training_evaluation_and_inference_see_the_same_network_input(paper_window_bundle, tmp_path, make):
    path = make(tmp_path)
    bundle = load_bundle(paper_window_bundle)
    percentiles = window_percentiles(bundle)
    assert percentiles == (0.0, 100.0)

    # medsr-train: the slices its commands train on (the preset's window), along medsr-infer's slice axis
    preset, slices, _, _ = _setup(
        {"threads": None, "sources": [str(path)], "modality": "mri", "preset": PRESET, "device": "cpu"}
    )
    assert (preset.intensity["low"], preset.intensity["high"]) == percentiles
    train = {max(s.index, 0): s.image for s in slices if s.axis == 2}
    # medsr-eval fidelity: its evaluation slices (the bundle's window)
    evaluated = {max(s.index, 0): s.image for s in load_eval_slices(eval_sources([path]), percentiles)}
    # medsr-infer: the planes its job hands the pipeline
    prepared = prepare_job(Job(path, "x"), tmp_path / "out.nii.gz", bundle, InferSettings())
    recorder = RecordingPipeline(bundle)
    super_resolve_volume(prepared.image, prepared.volume.affine, recorder, prepared.axis, InferSettings().options)

    assert prepared.axis == 2 and train and set(train) == set(evaluated) <= set(recorder.planes)
    for index, image in train.items():
        np.testing.assert_array_equal(image, evaluated[index])
        np.testing.assert_array_equal(image, recorder.planes[index])
    if prepared.volume.format != "nifti":  # a 2D image: the network sees the file's rows and columns
        rows, columns = prepared.volume.data.shape[1], prepared.volume.data.shape[0]
        assert train[0].shape == (rows, columns) and rows != columns
        assert train[0].min() == -1.0 and train[0].max() == 1.0  # the whole range: the (0, 100) window

"""Bundle loading: the typed manifest round-trips the shipped medsr.json, old manifests keep their meaning, and every
bad section is refused at load, naming the file and the field."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
from manifests import DEFAULT_MANIFEST, shipped_manifest_dict

from medsr.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    load_bundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from medsr.bundle.conditioning import PAPER, UPSAMPLED, Conditioning
from medsr.bundle.graphs import GRAPHS
from medsr.bundle.manifest import IntensityPolicy
from medsr.bundle.scheduler import SchedulerConfig
from medsr.degrade import KSpaceTruncation, LanczosDownsample
from medsr.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def _edit_manifest(root, edit):
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _edited_shipped(tmp_path, edit):
    """A directory holding only the shipped manifest after ``edit``: load_bundle must judge the manifest before it
    looks for any graph."""
    manifest = shipped_manifest_dict()
    edit(manifest)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return tmp_path


def test_valid_bundle_loads_with_its_contract(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest.format_version == FORMAT_VERSION
    assert set(bundle.graphs) == set(GRAPHS)
    for name, entry in bundle.graphs.items():
        assert entry.path == tiny_bundle / entry.file and entry.sha256 == sha256_file(entry.path)
        assert tuple(t.name for t in entry.inputs) == GRAPHS[name].inputs
        assert tuple(t.name for t in entry.outputs) == GRAPHS[name].outputs
    assert (bundle.scale, bundle.image_channels, bundle.vae_factor, bundle.lr_multiple) == (4, 1, 4, 4)
    assert bundle.manifest.provenance.weights.source == "random-init" and bundle.manifest.provenance.weights.seed == 0
    # the tiny preset names no degradation: export records what that means, k-space truncation at the scale
    assert bundle.manifest.task.degradation == KSpaceTruncation(4)
    assert bundle.manifest.scheduler == SchedulerConfig.from_dict(bundle.manifest.scheduler.to_dict())


def test_the_shipped_manifest_round_trips_exactly():
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8")
    manifest = read_manifest(DEFAULT_MANIFEST)
    assert manifest.to_dict() == json.loads(text)
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text  # key order too: export writes what ships


def test_the_shipped_manifest_by_attribute():
    m = read_manifest(DEFAULT_MANIFEST)
    assert m.task.intensity == IntensityPolicy("percentile", 0.5, 99.5, (-1.0, 1.0))
    assert (m.task.scale, m.task.consistency, m.task.degradation) == (4, "kspace", KSpaceTruncation(4))
    assert (m.vae.downsample_factor, m.vae.latent_channels, m.vae.lr_latent) == (1, 4, "mean")
    assert m.denoiser.conditioning == Conditioning(UPSAMPLED, "zerofill", residual=True)
    assert m.scheduler.algorithm == "ddim" and m.scheduler.default_steps == 1
    assert m.graphs["denoiser"].inputs[1].shape == ("batch", None, "lr_latent_height", "lr_latent_width")
    assert m.provenance.weights.sha256.startswith("802d3706")
    assert m.provenance.training_data["heldout"] == ("colin27-slab", "epi", "shoulder")
    assert m.provenance.recipe_config["vae_loop"]["steps"] == 300
    assert m.torch_reference.unet.config["block_out_channels"] == (32, 64, 128)
    assert m.validation["onnx_vs_torch"]["denoiser"][0]["outputs"]["model_output"]["psnr_db"] > 140


def test_the_manifest_is_read_only():
    m = read_manifest(DEFAULT_MANIFEST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.task.scale = 2
    with pytest.raises(TypeError):
        m.validation["parity"] = {}
    with pytest.raises(TypeError):
        m.provenance.recipe_config["vae"]["crop"] = 1


def test_the_export_writes_what_load_reads(tiny_bundle, tmp_path):
    manifest = load_bundle(tiny_bundle).manifest
    assert json.loads((tiny_bundle / MANIFEST_NAME).read_text()) == manifest.to_dict()
    replaced = dataclasses.replace(manifest, validation={**manifest.validation, "parity": {"passed": True}})
    written = read_manifest(write_manifest(tmp_path, replaced))
    assert written == replaced and written.validation["parity"]["passed"] is True
    assert written.validation["onnx_vs_torch"] == manifest.validation["onnx_vs_torch"]


def _drop(section, *keys):
    def edit(m):
        for key in keys:
            m[section].pop(key)

    return edit


def test_old_manifests_keep_their_meaning(tmp_path):
    def old(m):
        for key in ("conditioning", "residual", "upsampler"):  # before conditioning was recorded
            m["denoiser"].pop(key)
        for key in ("degradation", "consistency"):  # before degradation and consistency were recorded
            m["task"].pop(key)
        m["task"]["intensity"] = {}  # before the window was recorded
        m.pop("validation")
        m.pop("torch_reference")

    manifest = read_manifest(_edited_shipped(tmp_path, old) / MANIFEST_NAME)
    assert manifest.denoiser.conditioning == PAPER  # the paper's bilinear LR latent
    assert manifest.task.degradation == KSpaceTruncation(4)  # what the engine assumed: k-space at task.scale
    assert manifest.task.consistency == "none"
    assert manifest.task.intensity == IntensityPolicy()  # the 0.5 / 99.5 percentiles
    assert manifest.torch_reference is None and dict(manifest.validation) == {}


def test_a_null_degradation_is_kspace_at_the_scale():
    d = shipped_manifest_dict()
    d["task"]["degradation"] = None
    assert Manifest.from_dict(d, DEFAULT_MANIFEST).task.degradation == KSpaceTruncation(4)


def test_degradation_parameters_are_kept():
    d = shipped_manifest_dict()
    d["task"]["degradation"] = {"name": "kspace", "scale": 4, "window": "tukey", "alpha": 0.25}
    manifest = Manifest.from_dict(d, DEFAULT_MANIFEST)
    assert manifest.task.degradation == KSpaceTruncation(4, "tukey", 0.25)
    assert manifest.to_dict()["task"]["degradation"] == d["task"]["degradation"]
    d["task"].update(degradation={"name": "lanczos", "scale": 4}, consistency="backproject")
    assert Manifest.from_dict(d, DEFAULT_MANIFEST).task.degradation == LanczosDownsample(4)


def _set(path, value):
    """An edit setting the manifest field at dotted ``path`` (a trailing key may be new)."""

    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value

    return edit


BAD_SECTIONS = [
    # a manifest written by a future medsr
    (_set("format_version", FORMAT_VERSION + 1), "unknown format_version 2"),
    # a required section or field removed
    (lambda m: m.pop("scheduler"), r"missing field\(s\) scheduler in the manifest"),
    (lambda m: m["task"].pop("scale"), r"missing field\(s\) scale in task"),
    (_set("task.planes", "through"), r"task has unknown field\(s\) \['planes'\]"),
    (_set("task.plane", "through"), r"task\.plane must be one of \('in-plane', 'through-plane'\), got 'through'"),
    # scheduler (its own checks, SchedulerConfig.from_dict)
    (_set("scheduler.algorithm", "euler"), "scheduler `algorithm` must be one of"),
    (_set("scheduler.default_steps", 0), "scheduler `default_steps` must be in"),
    # the degradation: unknown name, another scale, a bad parameter
    (_set("task.degradation", {"name": "blur", "scale": 4}), "task.degradation: unknown degradation 'blur'"),
    (_set("task.degradation", {"name": "kspace", "scale": 2}), "task.degradation.scale must be task.scale 4, got 2"),
    (_set("task.degradation", {"name": "kspace", "scale": 4, "window": "gauss"}), "task.degradation: kspace window"),
    (_set("task.degradation", {"name": "kspace", "scale": 4, "sigma": 1}), "task.degradation: .*unknown \\['sigma'\\]"),
    (_set("task.degradation", [4]), "task.degradation must be a JSON object"),
    # the intensity window
    (_set("task.intensity.method", "minmax"), "task.intensity.method must be one of \\('percentile',\\)"),
    (_set("task.intensity.low", 99.5), r"task\.intensity\.low must be < high, got 99\.5 >= 99\.5"),
    (
        lambda m: m["task"]["intensity"].update(low=99.5, high=0.5),
        r"task\.intensity\.low must be < high, got 99\.5 >= 0\.5",
    ),
    (_set("task.intensity.high", 101), r"task\.intensity\.high must be a percentile in \[0, 100\], got 101"),
    (_set("task.intensity.low", -1), r"task\.intensity\.low must be a percentile in \[0, 100\]"),
    (_set("task.intensity.low", "0.5"), "task.intensity.low must be of type float"),
    (_set("task.intensity.range", [0.0, 1.0]), r"task\.intensity\.range must be \[-1\.0, 1\.0\]"),
    # the consistency mode: unknown, or not a projection for this degradation
    (_set("task.consistency", "dc"), "task.consistency: consistency must be one of none, kspace, backproject, project"),
    (_set("task.degradation", {"name": "bicubic", "scale": 4}), "task.consistency: consistency 'kspace' needs"),
    # task sizes
    (_set("task.scale", 8), "task.degradation.scale must be task.scale 8, got 4"),
    (lambda m: m["task"].update(scale=5, degradation=None), r"task\.scale: scale must be one of \(2, 3, 4\), got 5"),
    (_set("task.image_channels", 0), "task.image_channels must be >= 1, got 0"),
    (_set("task.lr_multiple", True), "task.lr_multiple must be of type int"),
    # the vae
    (_set("vae.scaling_factor", 0), "vae.scaling_factor must be > 0, got 0.0"),
    (_set("vae.shift_factor", float("nan")), "vae.shift_factor must be finite"),
    (_set("vae.lr_latent", "mode"), "vae.lr_latent must be one of"),
    (_set("vae.latent_channels", 4.0), "vae.latent_channels must be of type int"),
    (_set("vae.downsample_factor", 8), "task.lr_multiple must be a multiple of vae.downsample_factor 8, got 1"),
    (_drop("vae", "lr_latent"), r"missing field\(s\) lr_latent in vae"),
    # the denoiser
    (_set("denoiser.conditioning", "pixel_shuffle"), "denoiser.conditioning must be one of"),
    (_set("denoiser.prediction_type", "epsilon"), "denoiser.residual: a residual denoiser must predict x0"),
    (lambda m: m["denoiser"].update(prediction_type="epsilon", residual=False), "differs from scheduler.prediction"),
    (_set("denoiser.prediction_type", "noise"), "denoiser.prediction_type must be one of"),
    # the graphs
    (lambda m: m["graphs"]["denoiser"]["inputs"].reverse(), "graph denoiser has inputs"),
    (lambda m: m["graphs"].update(extra=m["graphs"]["denoiser"]), "unknown \\['extra'\\]"),
    (lambda m: m["graphs"].pop("vae_decoder"), "missing \\['vae_decoder'\\]"),
    (_set("graphs.denoiser.sha256", "abc"), "graphs.denoiser.sha256 must be 64 lowercase hex digits"),
    (_set("graphs.denoiser.file", "../denoiser.onnx"), "graphs.denoiser.file must be a relative path inside"),
    (_set("graphs.denoiser.file", "/tmp/denoiser.onnx"), "graphs.denoiser.file must be a relative path inside"),
    (_set("graphs.vae_encoder.precision", "int8"), "graphs.vae_encoder.precision must be one of"),
    (_set("graphs.vae_encoder.opset", "17"), "graphs.vae_encoder.opset must be of type int"),
    (_set("graphs.vae_decoder.outputs", [{"name": "image", "dtype": "float32"}]), r"missing field\(s\) shape"),
    (lambda m: m["graphs"]["denoiser"]["inputs"][2].update(dtype="int64"), r"graphs\.denoiser\.inputs\[2\]\.dtype"),
    (lambda m: m["graphs"]["denoiser"]["inputs"][0]["shape"].pop(), r"graphs\.denoiser\.inputs\[0\]\.shape must have"),
    (lambda m: m["graphs"]["vae_encoder"]["inputs"][0]["shape"].__setitem__(2, 64), r"axes \[0, 2, 3\] symbolic"),
    # provenance and the PyTorch reference
    (_drop("provenance", "weights"), r"missing field\(s\) weights in provenance"),
    (lambda m: m["provenance"]["weights"].pop("sha256"), r"missing field\(s\) sha256 in provenance\.weights"),
    (_set("provenance.weights.source", "web"), "provenance.weights.source must be one of"),
    (_set("provenance.training_data", {"train": "colin27"}), "provenance.training_data.train must be a list"),
    (_set("torch_reference.vae.file", "../vae.safetensors"), "torch_reference.vae.file must be a relative path"),
    (_set("validation", []), "validation must be a JSON object"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_SECTIONS)
def test_bad_sections_are_refused_at_load_naming_file_and_field(tmp_path, edit, message):
    root = _edited_shipped(tmp_path, edit)
    with pytest.raises(BundleError, match=rf"^{re.escape(str(tmp_path / MANIFEST_NAME))}: .*{message}") as refused:
        load_bundle(root)
    assert "\n" not in str(refused.value)


def _leaves(value, path=()):
    """Dotted paths of every leaf (and every list or object) of a JSON value, outside the free-form parts."""
    if path and path[0] in ("validation", "torch_reference") or path[:2] == ("provenance", "recipe_config"):
        return
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _leaves(item, (*path, key))


def test_any_odd_value_anywhere_is_a_bundle_error_or_accepted():
    """Whatever a field holds (null, a list, an object, a string, a negative number, NaN), parsing either accepts
    it or refuses it with a BundleError: never a TypeError or KeyError from deep inside."""
    shipped = shipped_manifest_dict()
    refused = 0
    for path in _leaves(shipped):
        for odd in (None, [], {}, "x", -1, float("nan")):
            manifest = shipped_manifest_dict()
            if not path:
                continue
            parent = manifest
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = odd
            try:
                Manifest.from_dict(manifest, DEFAULT_MANIFEST)
            except BundleError as exc:
                refused += 1
                assert str(exc).startswith(f"{DEFAULT_MANIFEST}: ") and "\n" not in str(exc)
    assert refused > 400


def test_bad_manifest_is_refused_before_the_graphs_are_opened(bundle_copy):
    _edit_manifest(bundle_copy, _set("task.intensity.low", 100))
    (bundle_copy / "denoiser.onnx").unlink()  # the manifest is judged first
    with pytest.raises(BundleError, match=r"medsr\.json: task\.intensity\.low must be < high, got 100\.0 >= 99\.5"):
        load_bundle(bundle_copy)


def test_modified_graph_is_refused_by_hash(bundle_copy):
    with open(bundle_copy / "denoiser.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="denoiser.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_missing_graph_is_named(bundle_copy):
    (bundle_copy / "vae_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="graph vae_decoder is missing"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a medsr bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="directory not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1]")
    with pytest.raises(BundleError, match="manifest must be a JSON object"):
        load_bundle(tmp_path)

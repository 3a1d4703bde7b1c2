"""Bundle loading refuses every mismatch it is meant to catch, naming it."""

from __future__ import annotations

import json
import shutil

import pytest

from medsr.bundle import FORMAT_VERSION, MANIFEST_NAME, load_bundle, sha256_file
from medsr.bundle.graphs import GRAPHS
from medsr.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def _edit_manifest(root, edit):
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_valid_bundle_loads_with_its_contract(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest["format_version"] == FORMAT_VERSION
    assert set(bundle.graphs) == set(GRAPHS)
    for name, entry in bundle.graphs.items():
        assert entry.sha256 == sha256_file(entry.path)
        assert entry.inputs == GRAPHS[name].inputs and entry.outputs == GRAPHS[name].outputs
    assert (bundle.scale, bundle.image_channels, bundle.vae_factor, bundle.lr_multiple) == (4, 1, 4, 4)
    assert bundle.manifest["provenance"]["weights"]["source"] == "random-init"


def test_modified_graph_is_refused_by_hash(bundle_copy):
    with open(bundle_copy / "denoiser.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="denoiser.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_missing_graph_is_named(bundle_copy):
    (bundle_copy / "vae_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="graph vae_decoder is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a manifest written by a future medsr
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "unknown format_version 2"),
        # a required section removed
        (lambda m: m.pop("scheduler"), "missing field.*scheduler"),
        # a task field removed
        (lambda m: m["task"].pop("scale"), r"missing field\(s\) scale in task"),
        # a graph renamed inputs (older export)
        (lambda m: m["graphs"]["denoiser"]["inputs"].reverse(), "graph denoiser has inputs"),
        # an extra graph this medsr does not know
        (lambda m: m["graphs"].update(extra=m["graphs"]["denoiser"]), "unknown \\['extra'\\]"),
    ],
)
def test_manifest_mismatches_are_named(bundle_copy, edit, message):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a medsr bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="directory not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)

"""medsr-export: three graphs with dynamic batch/height/width that agree with PyTorch, recorded in the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medsr.bundle import load_bundle
from medsr.cli.export import export
from medsr.engine.sessions import OrtSession
from medsr.eval.parity import compare_arrays
from medsr.export.builder import build_models
from medsr.export.models import graph_modules
from medsr.export.onnx import ExampleShape, example_inputs
from medsr.export.presets import get_preset
from medsr.export.reference import load_reference_models


def test_validation_figures_are_recorded_for_two_shapes(tiny_bundle):
    validation = load_bundle(tiny_bundle).manifest.validation["onnx_vs_torch"]
    for name, checks in validation.items():
        shapes = [tuple(map(tuple, check["input_shapes"].values())) for check in checks]
        assert len(shapes) == 2 and shapes[0] != shapes[1], name
        for check in checks:
            for figures in check["outputs"].values():
                assert figures["psnr_db"] > 100 and figures["rel_l2"] < 1e-5, (name, figures)


def test_graphs_run_at_a_third_unseen_shape_and_match_torch(tiny_bundle):
    """Dynamic axes really are dynamic: batch 3 and a size used neither at export nor validation."""
    bundle = load_bundle(tiny_bundle)
    preset = get_preset("tiny")
    modules = graph_modules(*load_reference_models(bundle))
    inputs = example_inputs(preset, ExampleShape(batch=3, lr_height=20, lr_width=12), seed=7)
    for name, module in modules.items():
        session = OrtSession(bundle.graph_path(name))
        onnx_out = session.run({key: value.numpy() for key, value in inputs[name].items()})
        with torch.no_grad():
            expected = module(*inputs[name].values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        for output_name, tensor in zip(session.output_names, expected):
            assert onnx_out[output_name].shape == tuple(tensor.shape)
            assert compare_arrays(onnx_out[output_name], tensor.numpy())["psnr_db"] > 100


def _centre_aligned_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resampling of the last two axes of ``x`` in NumPy, written from medsr's geometry: LR pixel i sits at
    HR coordinate s*i + (s-1)/2, so HR pixel j reads LR coordinate (j + 0.5) / s - 0.5, clamped to the edge pixels."""

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(source).astype(int)
        high, frac = np.minimum(low + 1, n_in - 1), source - low
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), low), 1 - frac)
        np.add.at(weights, (np.arange(n_out), high), frac)
        return weights

    return np.einsum("ph,...hw,qw->...pq", matrix(x.shape[-2], height), x, matrix(x.shape[-1], width))


def test_denoiser_graph_upsamples_lr_latent_centre_aligned(tiny_bundle, tmp_path):
    """The shipped denoiser graph resizes the LR latent to the sample's size itself, with the centre-aligned
    bilinear geometry: the resized latent, cut out of the graph where it enters the UNet, equals a NumPy oracle
    (align_corners=True or nearest would be off by far more than float error)."""
    import onnx
    import onnxruntime as ort
    import torch.nn.functional as F
    from onnx.utils import Extractor

    model = onnx.load(str(load_bundle(tiny_bundle).graph_path("denoiser")))
    resizes = [node for node in model.graph.node if node.op_type == "Resize" and node.input[0] == "lr_latent"]
    assert len(resizes) == 1, "the graph must resize lr_latent exactly once"
    upsampled = resizes[0].output[0]
    assert any(n.op_type == "Concat" and list(n.input) == ["sample", upsampled] for n in model.graph.node)
    probe = tmp_path / "upsampled_lr_latent.onnx"
    onnx.save(Extractor(model).extract_model(["sample", "lr_latent"], [upsampled]), str(probe))

    rng = np.random.default_rng(0)
    lr = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    sample = np.zeros((2, 4, 12, 20), np.float32)  # x4, non-square: the graph takes the size from the sample
    (got,) = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"]).run(
        None, {"sample": sample, "lr_latent": lr}
    )
    expected = _centre_aligned_bilinear(lr.astype(np.float64), 12, 20)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    lr_t = torch.from_numpy(lr)
    torch_half_pixel = F.interpolate(lr_t, size=(12, 20), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(torch_half_pixel, expected, rtol=0, atol=1e-5)  # the oracle is PyTorch's geometry
    for other in (
        F.interpolate(lr_t, size=(12, 20), mode="bilinear", align_corners=True),
        F.interpolate(lr_t, size=(12, 20), mode="nearest"),
    ):
        assert np.abs(other.numpy() - expected).max() > 0.1  # what the comparison above would catch


def test_cli_requires_weights_or_random_init(tmp_path):
    result = CliRunner().invoke(export, ["--preset", "tiny", "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "give exactly one of --weights FILE" in result.output
    assert not (tmp_path / "b").exists()


def test_cli_unknown_preset_lists_known(tmp_path):
    result = CliRunner().invoke(export, ["--preset", "nope", "--random-init", "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "unknown preset 'nope'" in result.output and "tiny" in result.output


def test_cli_refuses_existing_output(tiny_bundle):
    before = sorted(p.name for p in tiny_bundle.iterdir())
    result = CliRunner().invoke(export, ["--preset", "tiny", "--random-init", "-o", str(tiny_bundle)])
    assert result.exit_code == 1 and "pass --overwrite" in result.output
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_weights_file_round_trip_records_provenance(tmp_path):
    """Weights saved as vae.*/unet.* safetensors export to graphs computing with exactly those weights."""
    from safetensors.torch import save_file

    preset = get_preset("tiny")
    vae, unet, _ = build_models(preset, seed=123)
    state = {f"vae.{k}": v for k, v in vae.state_dict().items()} | {f"unet.{k}": v for k, v in unet.state_dict().items()}
    weights = tmp_path / "weights.safetensors"
    save_file(state, str(weights))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export, ["--preset", "tiny", "--weights", str(weights), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "medsr.json").read_text())
    assert manifest["provenance"]["weights"]["file"] == "weights.safetensors"
    assert manifest["provenance"]["objective"]["source"] == "preset"  # written by hand: no recorded objective
    reloaded_vae, _ = load_reference_models(load_bundle(out))
    for key, value in vae.state_dict().items():
        assert torch.equal(reloaded_vae.state_dict()[key], value), key


def test_weights_that_do_not_fit_are_named(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "bad.safetensors"
    save_file({"vae.encoder.conv_in.weight": torch.zeros(1)}, str(weights))
    result = CliRunner().invoke(export, ["--preset", "tiny", "--weights", str(weights), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert "wrong shape: vae.encoder.conv_in.weight" in result.output and "missing:" in result.output
    assert not (tmp_path / "b").exists()


def test_attention_preset_exports_and_validates(tmp_path):
    """Self-attention (VAE mid block, UNet level 2) exports with dynamic token counts."""
    preset = get_preset("tiny-attention")
    vae, unet, provenance = build_models(preset, seed=0)
    from medsr.export.onnx import export_bundle

    bundle = load_bundle(export_bundle(vae, unet, preset, tmp_path / "attn", provenance))
    for checks in bundle.manifest.validation["onnx_vs_torch"].values():
        for check in checks:
            assert all(fig["psnr_db"] > 100 for fig in check["outputs"].values())


def test_trt_plans_need_tensorrt_and_nothing_is_exported_without_it(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "b"
    result = CliRunner().invoke(export, ["--preset", "tiny", "--random-init", "-o", str(out), "--trt", "fp16"])
    assert result.exit_code == 1 and "TensorRT" in result.output
    assert not out.exists()

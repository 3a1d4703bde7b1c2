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
    validation = load_bundle(tiny_bundle).manifest["validation"]["onnx_vs_torch"]
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


def test_denoiser_graph_upsamples_lr_latent_itself(tiny_bundle):
    """The conditioning is inside the graph: changing only the LR latent changes the output."""
    session = OrtSession(load_bundle(tiny_bundle).graph_path("denoiser"))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    lr = rng.standard_normal((1, 4, 2, 2), dtype=np.float32)
    t = np.array([500.0], np.float32)
    a = session.run({"sample": sample, "lr_latent": lr, "timestep": t})["model_output"]
    b = session.run({"sample": sample, "lr_latent": lr + 1, "timestep": t})["model_output"]
    assert a.shape == (1, 4, 8, 8) and np.abs(a - b).max() > 1e-3


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
    for checks in bundle.manifest["validation"]["onnx_vs_torch"].values():
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

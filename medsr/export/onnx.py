"""Export of the three bundle graphs to ONNX, validated against PyTorch, written as a bundle (docs/bundle.md).

Uses the legacy TorchScript exporter (``dynamo=False``, opset 17, ``dynamic_axes``): it exports diffusers'
AutoencoderKL and UNet2DModel with dynamic batch, height and width and agrees with PyTorch to about 1e-6
(docs/sources.md, "Packages and exporters"), where the dynamo exporter needs extra care with batch-1 examples and
external data.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import medsr
from medsr.bundle import FORMAT_VERSION, sha256_file, write_manifest
from medsr.bundle.graphs import GRAPHS, GraphSpec
from medsr.bundle.manifest import (
    Denoiser,
    GraphEntry,
    IntensityPolicy,
    Manifest,
    Provenance,
    Task,
    TensorSpec,
    TorchReference,
    Vae,
)
from medsr.degrade import degradation_from_dict
from medsr.engine.compare import compare_arrays
from medsr.engine.schedulers import SchedulerConfig
from medsr.export.models import graph_modules
from medsr.export.presets import Preset
from medsr.io.atomic import atomic_dir

OPSET = 17


@dataclass(frozen=True)
class ExampleShape:
    """An LR slice size and batch used to build example inputs for export and validation."""

    batch: int
    lr_height: int
    lr_width: int


def example_inputs(preset: Preset, shape: ExampleShape, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs for every graph at one LR size: {graph: {input name: tensor}} (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    f, (s_h, s_w), c_lat = preset.vae_factor, preset.factors, preset.latent_channels
    lr_h, lr_w = shape.lr_height // f, shape.lr_width // f
    z_h, z_w = preset.conditioning.zooms(preset.factors)  # the conditioning latent: of the LR or of its upsampling

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator)

    return {
        "vae_encoder": {
            "image": randn(shape.batch, preset.image_channels, shape.lr_height, shape.lr_width).clamp(-1, 1)
        },
        "vae_decoder": {"latent": randn(shape.batch, c_lat, lr_h * s_h, lr_w * s_w)},
        "denoiser": {
            "sample": randn(shape.batch, c_lat, lr_h * s_h, lr_w * s_w),
            "lr_latent": randn(shape.batch, c_lat, z_h * lr_h, z_w * lr_w),
            "timestep": torch.rand(shape.batch, generator=generator) * 999.0,
        },
    }


def validation_shapes(preset: Preset) -> tuple[ExampleShape, ExampleShape]:
    """Two different shapes (batch, non-square, transposed) on which each graph is checked against PyTorch."""
    m = preset.lr_multiple
    return ExampleShape(1, 2 * m, 3 * m), ExampleShape(2, 3 * m, 2 * m)


def export_graph(module: torch.nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """Export one module to ``path`` with the spec's names and dynamic axes, then check and shape-infer it."""
    import onnx

    args = tuple(inputs[name] for name in spec.inputs)
    # The tracer warns about diffusers' shape asserts and batch-size branches; the graphs are validated against
    # PyTorch on two other shapes right after, which is the check that matters.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes={name: dict(axes) for name, axes in spec.dynamic_axes.items()},
        )
    onnx.checker.check_model(str(path))
    onnx.save(slim_graph(onnx.shape_inference.infer_shapes(onnx.load(str(path)))), str(path))


def slim_graph(model):
    """``model`` (an onnx.ModelProto) with constants folded and the tracer's shape arithmetic removed (onnxslim).

    Halves the node count of a UNet export and its ONNX Runtime load time (benchmarks/README.md); outputs are
    unchanged, which the ONNX-vs-PyTorch validation of every exported graph checks.
    """
    import onnxslim

    return onnxslim.slim(model)


def validate_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, inputs: dict[str, torch.Tensor]) -> dict:
    """Run the ONNX graph in ONNX Runtime (CPU) and the module in PyTorch on ``inputs``; compare every output."""
    from medsr.engine.sessions import OrtSession

    session = OrtSession(path, device="cpu")
    onnx_out = session.run({name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        torch_out = module(*(inputs[name] for name in spec.inputs))
    torch_out = torch_out if isinstance(torch_out, tuple) else (torch_out,)
    shapes = {name: list(tensor.shape) for name, tensor in inputs.items()}
    return {
        "input_shapes": shapes,
        "outputs": {name: compare_arrays(onnx_out[name], out.numpy()) for name, out in zip(spec.outputs, torch_out)},
    }


def _graph_record(spec: GraphSpec, path: Path) -> GraphEntry:
    def tensor(name: str, rank: int) -> TensorSpec:
        named = spec.dynamic_axes.get(name, {})
        return TensorSpec(name, "float32", tuple(named.get(i, None) for i in range(rank)))

    return GraphEntry(
        name=spec.name,
        file=spec.file,
        sha256=sha256_file(path),
        opset=OPSET,
        precision="fp32",
        inputs=tuple(tensor(n, spec.rank(n)) for n in spec.inputs),
        outputs=tuple(tensor(n, spec.rank(n)) for n in spec.outputs),
        path=path,
    )


def build_manifest(
    preset: Preset, graphs: dict[str, GraphEntry], validation: dict, provenance: dict, reference: dict
) -> Manifest:
    """The typed medsr.json of a bundle exported from ``preset`` (docs/bundle.md); ``provenance`` and ``reference``
    are the JSON objects of those sections (weights, recipe, training data, objective; the PyTorch reference)."""
    scheduler = SchedulerConfig(**preset.scheduler)
    degradation = preset.degradation and degradation_from_dict(preset.degradation)
    return Manifest(
        format_version=FORMAT_VERSION,
        name=preset.name,
        description=preset.description,
        medsr_version=medsr.__version__,
        task=Task(
            scale=preset.scale,
            image_channels=preset.image_channels,
            lr_multiple=preset.lr_multiple,
            intensity=IntensityPolicy(**preset.intensity),
            degradation=degradation,
            consistency=preset.consistency,
            plane=preset.plane,
            scales=preset.trained_scales,
        ),
        vae=Vae(
            downsample_factor=preset.vae_factor,
            latent_channels=preset.latent_channels,
            scaling_factor=preset.latent_scaling_factor,
            shift_factor=preset.latent_shift_factor,
            lr_latent=preset.lr_latent,
        ),
        denoiser=Denoiser(scheduler.prediction_type, preset.conditioning),
        scheduler=scheduler,
        graphs=graphs,
        provenance=Provenance.from_dict(provenance),
        validation=validation,
        torch_reference=TorchReference.from_dict(reference),
    )


def _save_torch_reference(vae, unet, preset: Preset, root: Path) -> dict:
    """Store the PyTorch weights (safetensors) and configs so ``--engine torch`` can rebuild the reference."""
    from safetensors.torch import save_file

    (root / "torch").mkdir()
    record = {}
    for name, module, config in (("vae", vae, preset.vae), ("unet", unet, preset.unet)):
        path = root / "torch" / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        record[name] = {"file": f"torch/{name}.safetensors", "sha256": sha256_file(path), "config": _jsonable(config)}
    return record


def _jsonable(config: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def export_bundle(
    vae, unet, preset: Preset, out_dir: str | os.PathLike, provenance: dict, overwrite: bool = False
) -> Path:
    """Export ``vae`` and ``unet`` (built from ``preset``) as a validated bundle directory ``out_dir``.

    The bundle is assembled in a temporary sibling directory and renamed into place (medsr.io.atomic), so
    ``out_dir`` is either the complete bundle or untouched. Returns the bundle path.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        write_bundle(vae, unet, preset, staging, provenance)
    return Path(out_dir)


def write_bundle(vae, unet, preset: Preset, directory: Path, provenance: dict) -> None:
    """Write the graphs, their validation against PyTorch, the reference weights and medsr.json into the existing
    empty ``directory``."""
    modules = graph_modules(vae.eval(), unet.eval(), preset.conditioning)
    first, second = validation_shapes(preset)
    export_inputs = example_inputs(preset, ExampleShape(2, first.lr_height, first.lr_width), seed=0)
    checks = [example_inputs(preset, shape, seed=1 + i) for i, shape in enumerate((first, second))]
    graphs, validation = {}, {}
    for name, spec in GRAPHS.items():
        path = directory / spec.file
        export_graph(modules[name], spec, export_inputs[name], path)
        graphs[name] = _graph_record(spec, path)
        validation[name] = [validate_graph(modules[name], spec, path, check[name]) for check in checks]
    reference = _save_torch_reference(vae, unet, preset, directory)
    provenance = {
        **provenance,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    write_manifest(directory, build_manifest(preset, graphs, {"onnx_vs_torch": validation}, provenance, reference))

"""The PyTorch reference: the bundle's own modules run in eager PyTorch behind the engine's Session interface.

``--engine torch`` and the parity harness use it. It shares the engine's NumPy scheduler, noise and loop
(medsr.engine.pipeline), so any difference between engines comes from the graphs and runtimes alone. Importing this
module registers it as the engine's ``torch`` backend (medsr.engine.sessions.register_backend): the engine never
imports the PyTorch side, the command-line layer imports this module when ``--engine torch`` or a torch reference
is asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from medsr.bundle import Bundle, sha256_file
from medsr.bundle.graphs import GRAPHS
from medsr.bundle.manifest import thaw
from medsr.engine.sessions import register_backend
from medsr.errors import BundleError
from medsr.export.models import build_unet, build_vae, graph_modules


class TorchSession:
    """A module run in eager PyTorch, float32, no grad, with the Session interface of medsr.engine.sessions."""

    def __init__(self, module: torch.nn.Module, name: str, device: str = "cpu"):
        spec = GRAPHS[name]
        self.module = module.to(device).eval()
        self.device = device
        self.input_names, self.output_names = spec.inputs, spec.outputs
        self.providers = (f"torch-{device}",)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self.input_names]
        with torch.inference_mode():
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outputs)}


def load_reference_models(bundle: Bundle):
    """Rebuild (vae, unet) from the bundle's ``torch_reference`` section (configs + safetensors, hash-checked)."""
    from safetensors.torch import load_file

    reference = bundle.manifest.torch_reference
    if reference is None:
        raise BundleError(f"{bundle.root}: bundle has no PyTorch reference weights (exported without them)")
    models = []
    for record, build in ((reference.vae, build_vae), (reference.unet, build_unet)):
        path = bundle.root / record.file
        if not path.is_file():
            raise BundleError(f"{bundle.root}: reference weights {record.file} not found")
        if sha256_file(path) != record.sha256:
            raise BundleError(f"{path}: sha256 mismatch with the manifest")
        model = build(thaw(record.config))
        model.load_state_dict(load_file(str(path)))
        models.append(model.eval())
    return tuple(models)


def open_torch_sessions(bundle: Bundle, device: str = "cpu", threads: int | None = None) -> dict[str, TorchSession]:
    """A TorchSession per graph of ``bundle``, with ``threads`` intra-op threads (default: torch's)."""
    if threads:
        torch.set_num_threads(threads)
    vae, unet = load_reference_models(bundle)
    return {
        name: TorchSession(module, name, device)
        for name, module in graph_modules(vae, unet, bundle.conditioning).items()
    }


def _open_backend(bundle: Bundle, device: str, threads: int | None, precision: str) -> dict[str, TorchSession]:
    """The registered opener: open_sessions has already checked ``precision`` (fp32, the reference's only one)."""
    return open_torch_sessions(bundle, device=device, threads=threads)


register_backend("torch", _open_backend)

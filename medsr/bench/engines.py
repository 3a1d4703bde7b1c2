"""The engines a benchmark compares, named ``engine[:precision]``: ort, torch, torch:bf16, openvino:bf16, trt:fp16...

``torch`` is the eager PyTorch reference in fp32; ``torch:bf16`` / ``torch:fp16`` run the same modules under
``torch.autocast`` (what a PyTorch user would do for reduced precision); ``torch:compile`` runs them through
``torch.compile`` (fp32). The others open the bundle's ONNX graphs through medsr.engine.sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsr.engine.sessions import ENGINES, open_sessions
from medsr.errors import BackendError

TORCH_VARIANTS = ("fp32", "bf16", "fp16", "compile")


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a benchmark: ``name`` in medsr.engine.sessions.ENGINES and a precision (or torch variant)."""

    name: str
    precision: str = "fp32"

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        name, _, precision = text.partition(":")
        if name not in ENGINES:
            raise BackendError(f"unknown engine {name!r} in {text!r}; choose one of {', '.join(ENGINES)}")
        if name == "torch" and (precision or "fp32") not in TORCH_VARIANTS:
            raise BackendError(f"torch variants are {', '.join(TORCH_VARIANTS)}, got {precision!r}")
        return cls(name, precision or "fp32")

    @property
    def label(self) -> str:
        return self.name if self.precision == "fp32" else f"{self.name}:{self.precision}"


class TorchVariantSession:
    """A TorchSession run under autocast (bf16/fp16) or through torch.compile; outputs float32 like every Session."""

    def __init__(self, session, variant: str):
        import torch

        self.session, self.variant = session, variant
        self.input_names, self.output_names = session.input_names, session.output_names
        self.providers = (f"{session.providers[0]}-{variant}",)
        if variant == "compile":
            session.module = torch.compile(session.module)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.variant == "compile":
            return self.session.run(feeds)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.variant]
        with torch.autocast(self.session.device.split(":")[0], dtype=dtype):
            return self.session.run(feeds)


def open_engine(bundle, spec: EngineSpec, device: str, threads: int | None) -> dict:
    """Sessions of ``spec`` for every graph of ``bundle``."""
    if spec.name != "torch":
        return open_sessions(bundle, spec.name, device=device, threads=threads, precision=spec.precision)
    import medsr.export.reference  # noqa: F401  registers the engine's torch backend

    sessions = open_sessions(bundle, "torch", device=device, threads=threads)
    if spec.precision == "fp32":
        return sessions
    return {name: TorchVariantSession(session, spec.precision) for name, session in sessions.items()}

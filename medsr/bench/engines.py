"""The engines a benchmark compares, named ``engine[:precision]``: ort, torch, torch:bf16, openvino:bf16, trt:fp16...

``torch`` is the eager PyTorch reference in fp32; ``torch:bf16`` / ``torch:fp16`` run the same modules under
``torch.autocast`` (what a PyTorch user would do for reduced precision); ``torch:compile`` runs them through
``torch.compile`` (fp32). ``auto`` (``auto:fp32``...) is what ``--engine auto`` picks on the device
(medsr.engine.select.choose_engine). The others open the bundle's ONNX graphs through medsr.engine.sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsr.engine.select import AUTO_ENGINE, ENGINE_CHOICES, choose_engine
from medsr.engine.sessions import open_sessions
from medsr.errors import BackendError

TORCH_VARIANTS = ("fp32", "bf16", "fp16", "compile")


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a benchmark: ``name`` in medsr.engine.select.ENGINE_CHOICES and a precision (or torch variant;
    ``auto`` for the engine ``auto``)."""

    name: str
    precision: str = "fp32"

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        name, _, precision = text.partition(":")
        if name not in ENGINE_CHOICES:
            raise BackendError(f"unknown engine {name!r} in {text!r}; choose one of {', '.join(ENGINE_CHOICES)}")
        if name == AUTO_ENGINE:
            return cls(name, precision or "auto")
        if name == "torch" and (precision or "fp32") not in TORCH_VARIANTS:
            raise BackendError(f"torch variants are {', '.join(TORCH_VARIANTS)}, got {precision!r}")
        return cls(name, precision or "fp32")

    @property
    def label(self) -> str:
        default = "auto" if self.name == AUTO_ENGINE else "fp32"
        return self.name if self.precision == default else f"{self.name}:{self.precision}"

    def resolve(self, device: str) -> tuple[EngineSpec, str]:
        """The spec that runs, and why: ``auto`` becomes the engine choose_engine picks; others stay as named."""
        if self.name != AUTO_ENGINE:
            return self, ""
        choice = choose_engine(device, self.precision)
        return EngineSpec(choice.engine, choice.precision), choice.reason


class TorchVariantSession:
    """A TorchSession run under autocast (bf16/fp16) or through torch.compile; outputs float32 like every Session."""

    def __init__(self, session, variant: str):
        import torch

        self.session, self.variant = session, variant
        self.input_names, self.output_names = session.input_names, session.output_names
        self.providers = (f"{session.providers[0]}-{variant}",)
        self.device = session.device
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
    """Sessions of ``spec`` for every graph of ``bundle`` (``auto``: of the engine it resolves to)."""
    spec, _ = spec.resolve(device)
    if spec.name != "torch":
        return open_sessions(bundle, spec.name, device=device, threads=threads, precision=spec.precision)
    import medsr.export.reference  # noqa: F401  registers the engine's torch backend

    sessions = open_sessions(bundle, "torch", device=device, threads=threads)
    if spec.precision == "fp32":
        return sessions
    return {name: TorchVariantSession(session, spec.precision) for name, session in sessions.items()}

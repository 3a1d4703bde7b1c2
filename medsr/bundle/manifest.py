"""The manifest ``medsr.json`` as one typed, frozen dataclass tree: export builds it, ``load_bundle`` parses it.

``Manifest.from_dict(d, path)`` checks every field (JSON type, allowed values, cross-field rules such as the
degradation's scale being the task's) and refuses the first bad one with a BundleError naming the file and the
field, e.g. ``m/medsr.json: task.intensity.low must be < high, got 99.5 >= 0.5``; ``to_dict()`` writes it back in
the same key order. Fields an older manifest lacks take the meaning they had when it was written (docs/bundle.md):
no conditioning fields = the paper's bilinear LR latent, no degradation = k-space truncation at ``task.scale``, no
consistency = ``"none"``. Free-form parts (checkpoint reports, the recipe's configuration, validation figures, the
PyTorch reference configs) are kept as read-only mappings (lists become tuples).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from medsr.bundle.conditioning import PAPER, SLICE_UPSAMPLERS, Conditioning
from medsr.bundle.graphs import GRAPHS
from medsr.bundle.scheduler import PREDICTION_TYPES, SchedulerConfig
from medsr.degrade import (
    BASELINES,
    OPERATORS,
    Degradation,
    KSpaceTruncation,
    ThickSlicePlanes,
    check_consistency,
    degradation_from_dict,
)
from medsr.errors import BundleError, InputError

FORMAT_VERSION = 1
#: Ways of mapping input intensities to the model range: robust percentiles of the whole volume (medsr.io.normalize).
INTENSITY_METHODS = ("percentile",)
#: The one model range the engine maps intensities to (and clips the networks' input to).
MODEL_RANGE = (-1.0, 1.0)
LR_LATENT_MODES = ("mean", "sample")
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16")
#: Element types of graph inputs and outputs the engine can feed and read.
TENSOR_DTYPES = ("float32", "float16")
WEIGHT_SOURCES = ("file", "random-init", "checkpoints", "checkpoints+random-init")
IN_PLANE, THROUGH_PLANE = "in-plane", "through-plane"
#: What a task upsamples (docs/bundle.md, ``task.plane``): both axes of a slice by s, or the second axis of a plane
#: that contains the slice axis (the slice direction) by s.
PLANES = (IN_PLANE, THROUGH_PLANE)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def freeze(value):
    """A JSON value made read-only: objects become MappingProxyType, lists tuples (recursively)."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value):
    """Inverse of :func:`freeze`: plain dicts and lists, ready for ``json.dumps``."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


def _check(value, kind: str, where: str):
    """``value`` if its JSON type is ``kind`` (``int``, ``float``, ``str``, ``bool``); a float is finite and an int
    counts as a float, a bool as neither."""
    expected = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}[kind]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, expected):
        raise BundleError(f"{where} must be of type {kind}, got {value!r}")
    if kind == "float":
        if not math.isfinite(value):
            raise BundleError(f"{where} must be finite, got {value!r}")
        return float(value)
    return value


def _at_least(value, minimum: int, where: str) -> int:
    if _check(value, "int", where) < minimum:
        raise BundleError(f"{where} must be >= {minimum}, got {value!r}")
    return value


def _one_of(value, allowed: tuple, where: str):
    if value not in allowed:
        raise BundleError(f"{where} must be one of {allowed}, got {value!r}")
    return value


def _section(value, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """``value`` checked to be a JSON object with the ``required`` keys and no key outside ``required + optional``."""
    if not isinstance(value, Mapping):
        raise BundleError(f"{where} must be a JSON object, got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise BundleError(f"missing field(s) {', '.join(missing)} in {where}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise BundleError(f"{where} has unknown field(s) {unknown}; known: {list(required + optional)}")
    return dict(value)


def _object(value, where: str) -> dict:
    """``value`` checked to be a JSON object with any keys (a free-form part), as a dict."""
    if not isinstance(value, Mapping):
        raise BundleError(f"{where} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _strings(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise BundleError(f"{where} must be a list of strings, got {value!r}")
    return tuple(_check(item, "str", f"{where}[{i}]") for i, item in enumerate(value))


def _sha256(value, where: str) -> str:
    if not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise BundleError(f"{where} must be 64 lowercase hex digits, got {value!r}")
    return value


def _check_version(version) -> None:
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(f"unknown format_version {version!r}; this medsr reads version {FORMAT_VERSION}")


def _bundle_file(value, where: str) -> str:
    """A relative path inside the bundle (no absolute path, no ``..``)."""
    path = PurePosixPath(_check(value, "str", where))
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise BundleError(f"{where} must be a relative path inside the bundle, got {value!r}")
    return value


@dataclass(frozen=True)
class IntensityPolicy:
    """How input intensities map to the model range: the ``low`` and ``high`` percentiles (in [0, 100]) of the
    volume go to ``range`` = (-1, 1) (medsr.io.normalize; docs/conventions.md)."""

    method: str = "percentile"
    low: float = 0.5
    high: float = 99.5
    range: tuple[float, float] = MODEL_RANGE

    def __post_init__(self):
        _one_of(self.method, INTENSITY_METHODS, "task.intensity.method")
        for name in ("low", "high"):
            value = _check(getattr(self, name), "float", f"task.intensity.{name}")
            if not 0.0 <= value <= 100.0:
                raise BundleError(f"task.intensity.{name} must be a percentile in [0, 100], got {value!r}")
            object.__setattr__(self, name, value)
        if not self.low < self.high:
            raise BundleError(f"task.intensity.low must be < high, got {self.low!r} >= {self.high!r}")
        bounds = tuple(_check(v, "float", "task.intensity.range") for v in self.range)
        if bounds != MODEL_RANGE:
            raise BundleError(f"task.intensity.range must be {list(MODEL_RANGE)}, got {list(self.range)}")
        object.__setattr__(self, "range", bounds)

    @classmethod
    def from_dict(cls, d) -> IntensityPolicy:
        d = _section(d, "task.intensity", (), ("range", "method", "low", "high"))
        if "range" in d and not (isinstance(d["range"], (list, tuple)) and len(d["range"]) == 2):
            raise BundleError(f"task.intensity.range must be [low, high], got {d['range']!r}")
        return cls(**{**d, **({"range": tuple(d["range"])} if "range" in d else {})})

    def to_dict(self) -> dict:
        return {"range": list(self.range), "method": self.method, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Task:
    """What the model does: x``scale`` SR of ``image_channels``-channel images whose LR sides are padded to
    multiples of ``lr_multiple``; the LR was made by ``degradation`` (an operator of medsr.degrade, with all its
    parameters; None, as older manifests meant, is k-space truncation at ``scale``), and ``consistency`` is the
    engine's default data-consistency mode.

    ``plane``: ``"in-plane"`` (what older manifests meant) upsamples both axes of a slice, s x s;
    ``"through-plane"`` upsamples the second axis W of a plane containing the slice axis, 1 x s (the slice
    direction), and its degradation is ``thick_slices``.

    ``scales``: every factor the one network serves, sorted, ``scale`` among them (empty: ``(scale,)``, what older
    manifests meant); several only through-plane, where :meth:`with_scale` gives the task at another of them.
    """

    scale: int
    image_channels: int
    lr_multiple: int
    intensity: IntensityPolicy = IntensityPolicy()
    degradation: Degradation | None = None
    consistency: str = "none"
    plane: str = IN_PLANE
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        _at_least(self.scale, 2, "task.scale")
        self._check_scales()
        _at_least(self.image_channels, 1, "task.image_channels")
        _at_least(self.lr_multiple, 1, "task.lr_multiple")
        _one_of(self.plane, PLANES, "task.plane")
        if self.degradation is None and self.plane == THROUGH_PLANE:
            raise BundleError(
                f"task.degradation is required with task.plane {THROUGH_PLANE!r}: "
                f'{{"name": "thick_slices", "scale": {self.scale}, "profile": "gaussian" or "box", "fwhm": ...}}'
            )
        if self.degradation is None:  # what manifests without a degradation meant: k-space truncation at the scale
            try:
                object.__setattr__(self, "degradation", KSpaceTruncation(self.scale))
            except InputError as exc:
                raise BundleError(f"task.scale: {exc}") from None
        if not isinstance(self.degradation, Degradation):
            raise BundleError(f"task.degradation must be a medsr.degrade operator, got {self.degradation!r}")
        if isinstance(self.degradation, ThickSlicePlanes) != (self.plane == THROUGH_PLANE):
            through = self.plane == THROUGH_PLANE
            fitting = [name for name in sorted(OPERATORS) if (name == ThickSlicePlanes.name) == through]
            raise BundleError(
                f"task.degradation {self.degradation.name!r} does not fit task.plane {self.plane!r}, which takes "
                f"{', '.join(fitting)}"
            )
        if self.degradation.scale != self.scale:
            raise BundleError(f"task.degradation.scale must be task.scale {self.scale}, got {self.degradation.scale!r}")
        try:
            check_consistency(self.consistency, self.degradation)
        except InputError as exc:
            raise BundleError(f"task.consistency: {exc}") from None

    def _check_scales(self) -> None:
        """``scales`` made a tuple (``(scale,)`` when empty) and refused unless sorted, distinct, all >= 2, with
        ``scale`` among them, and a single factor in-plane."""
        if not isinstance(self.scales, (list, tuple)):
            raise BundleError(f"task.scales must be a list of integers, got {self.scales!r}")
        scales = tuple(_at_least(s, 2, f"task.scales[{i}]") for i, s in enumerate(self.scales)) or (self.scale,)
        if list(scales) != sorted(set(scales)):
            raise BundleError(f"task.scales must be sorted and distinct, got {list(scales)}")
        if self.scale not in scales:
            raise BundleError(f"task.scales must contain task.scale {self.scale}, got {list(scales)}")
        if len(scales) > 1 and self.plane != THROUGH_PLANE:
            raise BundleError(
                f"task.scales {list(scales)}: several factors need task.plane {THROUGH_PLANE!r}, got {self.plane!r}"
            )
        object.__setattr__(self, "scales", scales)

    @property
    def factors(self) -> tuple[int, int]:
        """The upsampling factor of each plane axis (H, W): (s, s) in-plane, (1, s) through-plane."""
        return (1, self.scale) if self.plane == THROUGH_PLANE else (self.scale, self.scale)

    def with_scale(self, scale: int) -> Task:
        """This task at ``scale``, one of ``scales``: the degradation at that factor, a thick-slice FWHM in
        proportion to it (FWHM / s as at ``self.scale``, e.g. FWHM 4 at x4 -> 6 at x6). BundleError otherwise."""
        if scale not in self.scales:
            raise BundleError(
                f"x{scale} is not a factor of this model: it serves {', '.join(f'x{s}' for s in self.scales)} "
                "(task.scales)"
            )
        if scale == self.scale:
            return self
        degradation = dataclasses.replace(
            self.degradation, scale=scale, fwhm=self.degradation.fwhm * scale / self.scale
        )
        return dataclasses.replace(self, scale=scale, degradation=degradation)

    @classmethod
    def from_dict(cls, d) -> Task:
        optional = ("scales", "degradation", "consistency", "plane")
        d = _section(d, "task", ("scale", "image_channels", "lr_multiple", "intensity"), optional)
        degradation = d.get("degradation")
        if degradation is not None:
            if not isinstance(degradation, Mapping):
                raise BundleError(f"task.degradation must be a JSON object, got {degradation!r}")
            try:
                degradation = degradation_from_dict(dict(degradation))
            except InputError as exc:
                raise BundleError(f"task.degradation: {exc}") from None
        return cls(
            scale=d["scale"],
            image_channels=d["image_channels"],
            lr_multiple=d["lr_multiple"],
            intensity=IntensityPolicy.from_dict(d["intensity"]),
            degradation=degradation,
            consistency=d.get("consistency", "none"),
            plane=d.get("plane", IN_PLANE),
            scales=d.get("scales", ()),
        )

    def to_dict(self) -> dict:
        """The manifest's ``task``; ``plane`` is written for a through-plane task only (in-plane is the default),
        ``scales`` only when it holds more than ``scale``."""
        out = {
            "scale": self.scale,
            **({"scales": list(self.scales)} if self.scales != (self.scale,) else {}),
            "image_channels": self.image_channels,
            "lr_multiple": self.lr_multiple,
            "intensity": self.intensity.to_dict(),
            "degradation": self.degradation.to_dict(),
            "consistency": self.consistency,
        }
        return out if self.plane == IN_PLANE else {**out, "plane": self.plane}


@dataclass(frozen=True)
class Vae:
    """The latent convention: the VAE downsamples by ``downsample_factor`` into ``latent_channels`` channels; the
    engine works on z = (posterior latent - ``shift_factor``) * ``scaling_factor``; the LR latent is the posterior
    mean or a seeded sample (``lr_latent``)."""

    downsample_factor: int
    latent_channels: int
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    lr_latent: str = "mean"

    def __post_init__(self):
        _at_least(self.downsample_factor, 1, "vae.downsample_factor")
        _at_least(self.latent_channels, 1, "vae.latent_channels")
        for name in ("scaling_factor", "shift_factor"):
            object.__setattr__(self, name, _check(getattr(self, name), "float", f"vae.{name}"))
        if self.scaling_factor <= 0.0:
            raise BundleError(f"vae.scaling_factor must be > 0, got {self.scaling_factor!r}")
        _one_of(self.lr_latent, LR_LATENT_MODES, "vae.lr_latent")

    @classmethod
    def from_dict(cls, d) -> Vae:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        return cls(**_section(d, "vae", fields))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Denoiser:
    """What the denoiser graph outputs (a scheduler prediction type) and how it sees the LR slice."""

    prediction_type: str
    conditioning: Conditioning = PAPER

    def __post_init__(self):
        _one_of(self.prediction_type, PREDICTION_TYPES, "denoiser.prediction_type")
        self.conditioning.check_prediction(self.prediction_type)

    @classmethod
    def from_dict(cls, d) -> Denoiser:
        d = _section(d, "denoiser", ("prediction_type",), ("conditioning", "residual", "upsampler"))
        _one_of(d["prediction_type"], PREDICTION_TYPES, "denoiser.prediction_type")
        return cls(d["prediction_type"], Conditioning.from_manifest(d))

    def to_dict(self) -> dict:
        return {"prediction_type": self.prediction_type, **self.conditioning.to_manifest()}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, element type and shape (a symbolic name, a size, or None per axis)."""

    name: str
    dtype: str
    shape: tuple[str | int | None, ...]

    @classmethod
    def from_dict(cls, d, where: str) -> TensorSpec:
        d = _section(d, where, ("name", "dtype", "shape"))
        if not isinstance(d["shape"], (list, tuple)) or any(
            not (axis is None or isinstance(axis, str) or type(axis) is int and axis >= 1) for axis in d["shape"]
        ):
            raise BundleError(f"{where}.shape must be a list of axis names, sizes >= 1 or null, got {d['shape']!r}")
        return cls(
            _check(d["name"], "str", f"{where}.name"), _check(d["dtype"], "str", f"{where}.dtype"), tuple(d["shape"])
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph of the bundle: its ``file`` (relative to the bundle), sha256, opset, precision and I/O specs,
    whose names are those of medsr.bundle.graphs. ``path`` is where the file lies (the manifest's directory joined
    with ``file``); it is not written to the manifest."""

    name: str
    file: str
    sha256: str
    opset: int
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    path: Path = field(compare=False)

    def __post_init__(self):
        where = f"graphs.{self.name}"
        spec = GRAPHS.get(self.name)
        if spec is None:
            raise BundleError(f"graphs must be {sorted(GRAPHS)}; unknown {[self.name]}")
        _bundle_file(self.file, f"{where}.file")
        _sha256(self.sha256, f"{where}.sha256")
        _at_least(self.opset, 7, f"{where}.opset")
        _one_of(self.precision, GRAPH_PRECISIONS, f"{where}.precision")
        inputs, outputs = tuple(t.name for t in self.inputs), tuple(t.name for t in self.outputs)
        if inputs != spec.inputs or outputs != spec.outputs:
            raise BundleError(
                f"graph {self.name} has inputs {inputs} and outputs {outputs}; "
                f"this medsr expects {spec.inputs} -> {spec.outputs}"
            )
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            for i, tensor in enumerate(tensors):
                _one_of(tensor.dtype, TENSOR_DTYPES, f"{where}.{kind}[{i}].dtype")
                dynamic = spec.dynamic_axes[tensor.name]
                if len(tensor.shape) != spec.rank(tensor.name) or any(
                    not isinstance(tensor.shape[axis], str) for axis in dynamic
                ):
                    raise BundleError(
                        f"{where}.{kind}[{i}].shape must have {spec.rank(tensor.name)} axes, axes {sorted(dynamic)} "
                        f"symbolic (dynamic), got {list(tensor.shape)}"
                    )

    @classmethod
    def from_dict(cls, name: str, d, root: Path) -> GraphEntry:
        where = f"graphs.{name}"
        d = _section(d, where, ("file", "sha256", "opset", "precision", "inputs", "outputs"))
        specs = {}
        for key in ("inputs", "outputs"):
            if not isinstance(d[key], (list, tuple)):
                raise BundleError(f"{where}.{key} must be a list, got {d[key]!r}")
            specs[key] = tuple(TensorSpec.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(d[key]))
        file = _bundle_file(d["file"], f"{where}.file")
        return cls(name, file, d["sha256"], d["opset"], d["precision"], path=Path(root) / file, **specs)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "opset": self.opset,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class Weights:
    """Where the weights came from: ``source`` ``"file"`` (medsr safetensors: ``file``, ``sha256``), ``"random-init"``
    (``seed``), ``"checkpoints"`` or ``"checkpoints+random-init"`` (published checkpoints: the ``vae`` and ``unet``
    loader reports, read-only mappings, each a report or the random-init record)."""

    source: str
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None
    vae: Mapping | None = None
    unet: Mapping | None = None

    def __post_init__(self):
        _one_of(self.source, WEIGHT_SOURCES, "provenance.weights.source")
        required = {"file": ("file", "sha256"), "random-init": ("seed",)}.get(self.source, ("vae", "unet"))
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise BundleError(f"missing field(s) {', '.join(missing)} in provenance.weights (source {self.source!r})")
        if self.file is not None:
            _check(self.file, "str", "provenance.weights.file")
        if self.sha256 is not None:
            _sha256(self.sha256, "provenance.weights.sha256")
        if self.seed is not None:
            _check(self.seed, "int", "provenance.weights.seed")
        for name in ("vae", "unet"):
            part = getattr(self, name)
            if part is not None:
                object.__setattr__(self, name, freeze(_object(part, f"provenance.weights.{name}")))

    @classmethod
    def from_dict(cls, d) -> Weights:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        return cls(**_section(d, "provenance.weights", ("source",), fields[1:]))

    def to_dict(self) -> dict:
        return {
            f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class Provenance:
    """How the model was made: its ``weights``, the ``recipe`` that trained it, the names of its ``training_data``
    per split (e.g. ``train``, ``heldout``), the recipe's configuration and the training ``objective`` (free-form,
    read-only), when and with which PyTorch it was ``exported``."""

    weights: Weights
    recipe: str | None = None
    training_data: Mapping[str, tuple[str, ...]] | None = None
    recipe_config: Mapping | None = None
    objective: Mapping | None = None
    exported: str | None = None
    torch_version: str | None = None

    def __post_init__(self):
        for name in ("recipe", "exported", "torch_version"):
            if getattr(self, name) is not None:
                _check(getattr(self, name), "str", f"provenance.{name}")
        if self.training_data is not None:
            data = _object(self.training_data, "provenance.training_data")
            parts = {part: _strings(names, f"provenance.training_data.{part}") for part, names in data.items()}
            object.__setattr__(self, "training_data", MappingProxyType(parts))
        for name in ("recipe_config", "objective"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, freeze(_object(value, f"provenance.{name}")))

    @classmethod
    def from_dict(cls, d) -> Provenance:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        d = _section(d, "provenance", ("weights",), fields[1:])
        return cls(**{**d, "weights": Weights.from_dict(d["weights"])})

    def to_dict(self) -> dict:
        out = {"weights": self.weights.to_dict()}
        for f in dataclasses.fields(self)[1:]:
            if getattr(self, f.name) is not None:
                out[f.name] = thaw(getattr(self, f.name))
        return out


@dataclass(frozen=True)
class ReferenceModel:
    """One PyTorch reference network: its safetensors ``file`` in the bundle, sha256 and constructor ``config``."""

    file: str
    sha256: str
    config: Mapping

    @classmethod
    def from_dict(cls, d, where: str) -> ReferenceModel:
        d = _section(d, where, ("file", "sha256", "config"))
        config = _object(d["config"], f"{where}.config")
        return cls(_bundle_file(d["file"], f"{where}.file"), _sha256(d["sha256"], f"{where}.sha256"), freeze(config))

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "config": thaw(self.config)}


@dataclass(frozen=True)
class TorchReference:
    """The PyTorch reference weights (``--engine torch`` and the parity harness rebuild the networks from them)."""

    vae: ReferenceModel
    unet: ReferenceModel

    @classmethod
    def from_dict(cls, d) -> TorchReference:
        d = _section(d, "torch_reference", ("vae", "unet"))
        return cls(*(ReferenceModel.from_dict(d[name], f"torch_reference.{name}") for name in ("vae", "unet")))

    def to_dict(self) -> dict:
        return {"vae": self.vae.to_dict(), "unet": self.unet.to_dict()}


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``medsr.json`` (docs/bundle.md documents every field). ``validation`` holds the export's figures
    (read-only, free-form: ``onnx_vs_torch`` per graph, ``parity`` after ``medsr-export --validate``)."""

    format_version: int
    name: str
    description: str
    medsr_version: str | None
    task: Task
    vae: Vae
    denoiser: Denoiser
    scheduler: SchedulerConfig
    graphs: Mapping[str, GraphEntry]
    provenance: Provenance
    validation: Mapping = field(default_factory=dict)
    torch_reference: TorchReference | None = None

    def __post_init__(self):
        _check_version(self.format_version)
        if not _check(self.name, "str", "name"):
            raise BundleError("name must not be empty")
        _check(self.description, "str", "description")
        if self.medsr_version is not None:
            _check(self.medsr_version, "str", "medsr_version")
        if self.task.lr_multiple % self.vae.downsample_factor:
            raise BundleError(
                f"task.lr_multiple must be a multiple of vae.downsample_factor {self.vae.downsample_factor}, "
                f"got {self.task.lr_multiple}"
            )
        upsampler = self.denoiser.conditioning.upsampler
        if upsampler is not None and (upsampler in SLICE_UPSAMPLERS) != (self.task.plane == THROUGH_PLANE):
            fitting = SLICE_UPSAMPLERS if self.task.plane == THROUGH_PLANE else BASELINES
            raise BundleError(
                f"denoiser.upsampler {upsampler!r} does not fit task.plane {self.task.plane!r}, which takes "
                f"{', '.join(fitting)}"
            )
        if self.denoiser.prediction_type != self.scheduler.prediction_type:
            raise BundleError(
                f"denoiser.prediction_type {self.denoiser.prediction_type!r} differs from scheduler.prediction_type "
                f"{self.scheduler.prediction_type!r}"
            )
        unknown, missing = sorted(set(self.graphs) - set(GRAPHS)), sorted(set(GRAPHS) - set(self.graphs))
        if unknown or missing:
            raise BundleError(f"graphs must be {sorted(GRAPHS)}; missing {missing}, unknown {unknown}")
        object.__setattr__(self, "graphs", MappingProxyType({name: self.graphs[name] for name in GRAPHS}))
        object.__setattr__(self, "validation", freeze(_object(self.validation, "validation")))

    @classmethod
    def from_dict(cls, d, path: str | Path) -> Manifest:
        """Parse and check a manifest read from ``path`` (the medsr.json file; graph paths are resolved next to it).

        Raises:
            BundleError: ``"{path}: {field} ..."`` for the first missing, unknown, mistyped or out-of-range field.
        """
        try:
            return cls._parse(d, Path(path).parent)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None

    @classmethod
    def _parse(cls, d, root: Path) -> Manifest:
        if not isinstance(d, Mapping):
            raise BundleError("manifest must be a JSON object")
        _check_version(d.get("format_version"))  # first: a later format may differ anywhere
        required = ("format_version", "name", "task", "vae", "denoiser", "scheduler", "graphs", "provenance")
        d = _section(d, "the manifest", required, ("description", "medsr_version", "validation", "torch_reference"))
        graphs = _object(d["graphs"], "graphs")
        reference = d.get("torch_reference")
        return cls(
            format_version=d["format_version"],
            name=d["name"],
            description=d.get("description", ""),
            medsr_version=d.get("medsr_version"),
            task=Task.from_dict(d["task"]),
            vae=Vae.from_dict(d["vae"]),
            denoiser=Denoiser.from_dict(d["denoiser"]),
            scheduler=SchedulerConfig.from_dict(d["scheduler"]),
            graphs={name: GraphEntry.from_dict(name, record, root) for name, record in graphs.items()},
            provenance=Provenance.from_dict(d["provenance"]),
            validation=d.get("validation", {}),
            torch_reference=None if reference is None else TorchReference.from_dict(reference),
        )

    def to_dict(self) -> dict:
        """The JSON object of ``medsr.json`` (optional fields that are None are left out)."""
        out = {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "medsr_version": self.medsr_version,
            "task": self.task.to_dict(),
            "vae": self.vae.to_dict(),
            "denoiser": self.denoiser.to_dict(),
            "scheduler": self.scheduler.to_dict(),
            "graphs": {name: entry.to_dict() for name, entry in self.graphs.items()},
            "provenance": self.provenance.to_dict(),
            "validation": thaw(self.validation),
            "torch_reference": None if self.torch_reference is None else self.torch_reference.to_dict(),
        }
        return {key: value for key, value in out.items() if value is not None}

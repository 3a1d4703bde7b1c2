"""The serving contract of medsr and the batching behind it, independent of Triton (docs/serving.md).

A request is a batch of LR planes, float32 (B, H, W), in the input's units (MR signal, CT HU, stored pixel values
after the rescale): the server owns the model's normalization as medsr-infer does, so a PACS gateway sends what it
read and writes what it gets back. The intensity window is the bundle's percentile window fitted over all the
request's planes (a request holding a whole volume is normalized as medsr-infer normalizes that volume), unless the
request names one with the parameters ``window_low`` and ``window_high`` (a volume sent in several requests keeps
one window). The response holds the SR planes (B, s*H, s*W) float32 in the same units, the consistency residual of
each plane (B, 1) and the window used (B, 2).

Parameters (all optional): ``steps`` (>= 1, default the bundle's), ``seed`` (>= 0, default 0), ``consistency``
(none, kspace, backproject; default the bundle's), ``first_index`` (>= 0, default 0), ``window_low`` and
``window_high`` (numbers, or strings holding numbers). Plane i of a request is seeded
``np.random.default_rng([seed, first_index + i])`` exactly as medsr.engine.pipeline seeds it, so its result is the
pipeline's for the same input and seed, whatever other requests Triton batched it with and in which order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medsr.degrade import CONSISTENCY_MODES, check_consistency, consistency_residual
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.volume import min_plane_side, window_percentiles
from medsr.errors import InputError, MedsrError
from medsr.io.limits import MemoryLimit, format_size
from medsr.io.normalize import IntensityWindow, denormalize, fit_window, normalize

#: Names of the model's tensors (config.pbtxt, the client).
INPUT_NAME = "LR"
OUTPUT_NAMES = ("SR", "RESIDUAL", "WINDOW")
#: The request parameters the model reads; any other is refused (a misspelt ``step`` must not be ignored).
PARAMETERS = ("steps", "seed", "consistency", "first_index", "window_low", "window_high")
#: Parameters that Triton's frontends may attach to a request themselves; never user input.
_TRITON_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"})
#: Longest LR plane side a request may hold: bounds the memory of one request (planes above the tile size run in
#: tiles, one plane at a time).
MAX_SIDE = 2048
#: Default bound on the image arrays of one request (medsr-serve --max-request-memory): 1 GiB holds 16 planes of
#: 400 x 400 at x4 (820 MiB, medsr.io.limits.MemoryLimit.estimate) and refuses one plane of 2048 x 2048 (1.3 GiB).
DEFAULT_MAX_REQUEST_BYTES = 1 << 30


@dataclass(frozen=True)
class PlaneRequest:
    """One checked request: LR planes in the input's units and how to sample them."""

    lr: np.ndarray
    steps: int | None
    seed: int
    consistency: str
    first_index: int
    window: IntensityWindow

    @property
    def key(self) -> tuple:
        """Requests with the same key run in one engine batch."""
        return (self.lr.shape[1:], self.steps, self.consistency)


@dataclass(frozen=True)
class PlaneResponse:
    """SR planes (B, s*H, s*W) float32 in the input's units, residuals (B, 1) float32, window (B, 2) float32."""

    sr: np.ndarray
    residual: np.ndarray
    window: np.ndarray

    def outputs(self) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUT_NAMES, (self.sr, self.residual, self.window)))


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise InputError(f"parameter {name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"parameter {name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise InputError(f"parameter {name} must be an integer >= {minimum}, got {value!r}")
    return number


def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise InputError(f"parameter {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"parameter {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"parameter {name} must be finite, got {value!r}")
    return number


class PlaneService:
    """Super-resolve requests of LR planes with one pipeline (medsr.engine.pipeline.LatentSRPipeline).

    Args:
        pipeline: the engine (its sessions stay open for the life of the service).
        tile_size, tile_overlap: as medsr-infer's --tile and --tile-overlap (planes with a side above ``tile_size``
            run in tiles, one plane at a time).
        max_request_bytes: the most memory the image arrays of one request may need (input, normalized copy, SR
            output; medsr.io.limits.MemoryLimit.estimate); a larger request is refused with an InputError before any
            work, and the service goes on serving the others. None: no bound beyond MAX_SIDE.
    """

    def __init__(
        self,
        pipeline: LatentSRPipeline,
        tile_size: int | None = 128,
        tile_overlap: int = 32,
        max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self.pipeline = pipeline
        self.bundle = pipeline.bundle
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.min_side = min_plane_side(self.bundle)
        self.memory = None
        if max_request_bytes is not None:
            self.memory = MemoryLimit(max_request_bytes, self.bundle.scale, "the server's --max-request-memory")

    def parse(self, lr, parameters: Mapping | None = None) -> PlaneRequest:
        """Check one request's LR array and parameters; InputError names what is wrong."""
        parameters = dict(parameters or {})
        unknown = sorted(set(parameters) - set(PARAMETERS) - _TRITON_PARAMETERS)
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(unknown)}; the model takes {', '.join(PARAMETERS)}")
        lr = np.asarray(lr)
        if lr.dtype != np.float32:
            raise InputError(f"{INPUT_NAME} must be float32 planes (B, H, W), got {lr.dtype}")
        if lr.ndim != 3:
            raise InputError(f"{INPUT_NAME} must be shaped (B, H, W), got {lr.shape}")
        if lr.shape[0] == 0:
            raise InputError(f"{INPUT_NAME} holds no plane (batch of 0)")
        if min(lr.shape[1:]) < self.min_side or max(lr.shape[1:]) > MAX_SIDE:
            raise InputError(
                f"{INPUT_NAME} planes must have sides from {self.min_side} to {MAX_SIDE} pixels, got {lr.shape[1:]}"
            )
        if self.memory is not None and self.memory.estimate(lr.shape) > self.memory.max_bytes:
            needed = self.memory.estimate(lr.shape)
            raise InputError(
                f"request of {lr.shape[0]} plane(s) of {lr.shape[1]} x {lr.shape[2]} needs about {format_size(needed)} "
                f"to super-resolve x{self.memory.scale}, over the limit of {format_size(self.memory.max_bytes)} per "
                f"request ({self.memory.source}); send fewer or smaller planes"
            )
        if not np.isfinite(lr).all():
            raise InputError(f"{INPUT_NAME} holds {int(np.size(lr) - np.isfinite(lr).sum())} NaN/Inf value(s)")
        steps = parameters.get("steps")
        steps = None if steps is None else _integer("steps", steps, 1)
        seed = _integer("seed", parameters.get("seed", 0), 0)
        first_index = _integer("first_index", parameters.get("first_index", 0), 0)
        consistency = parameters.get("consistency") or self.bundle.manifest.task.consistency
        if consistency not in CONSISTENCY_MODES:
            raise InputError(
                f"parameter consistency must be one of {', '.join(CONSISTENCY_MODES)}, got {consistency!r}"
            )
        check_consistency(consistency, self.pipeline.degradation)
        if ("window_low" in parameters) != ("window_high" in parameters):
            raise InputError("parameters window_low and window_high go together")
        if "window_low" in parameters:
            low, high = (
                _number("window_low", parameters["window_low"]),
                _number("window_high", parameters["window_high"]),
            )
            if low == high:
                raise InputError(f"window_low and window_high must differ, got {low:g} for both")
            window = IntensityWindow(low, high)
        else:
            window = fit_window(lr, *window_percentiles(self.bundle))
        return PlaneRequest(lr, steps, seed, consistency, first_index, window)

    def run(self, requests: Sequence[PlaneRequest | MedsrError]) -> list[PlaneResponse | MedsrError]:
        """Responses in the order of ``requests``; an error (given, or raised while running a request's group)
        is returned in the place of its response, so one bad request never fails the others."""
        results: list[PlaneResponse | MedsrError | None] = list(requests)
        groups: dict[tuple, list[int]] = {}
        for position, request in enumerate(requests):
            if isinstance(request, PlaneRequest):
                groups.setdefault(request.key, []).append(position)
        for members in groups.values():
            try:
                for position, response in zip(members, self._run_group([requests[p] for p in members])):
                    results[position] = response
            except MedsrError as exc:
                if len(members) == 1:
                    results[members[0]] = exc
                    continue
                for position in members:  # alone, so that only the request at fault fails
                    try:
                        results[position] = self._run_group([requests[position]])[0]
                    except MedsrError as alone:
                        results[position] = alone
        return results

    def _run_group(self, group: list[PlaneRequest]) -> list[PlaneResponse]:
        """Requests of one plane shape, steps and consistency: one engine run over all their planes."""
        windows = [request.window for request in group]
        lrs = [normalize(request.lr, window, clip=False)[0] for request, window in zip(group, windows)]
        first = group[0]
        if self.tile_size is not None and max(first.lr.shape[1:]) > self.tile_size:
            srs = [
                self.pipeline.super_resolve(lr, self._options(request), first_index=request.first_index).images
                for request, lr in zip(group, lrs)
            ]
        else:
            seeds = [(request.seed, request.first_index + i) for request in group for i in range(len(request.lr))]
            stacked = np.concatenate(lrs)
            rngs = [np.random.default_rng(list(seed)) for seed in seeds]
            clipped = np.clip(stacked, -1.0, 1.0).astype(np.float32)
            sr = self.pipeline.run_batch(clipped, rngs, [index for _, index in seeds], first.steps)
            whole = self.pipeline.enforce_consistency(sr, stacked, first.consistency).astype(np.float32)
            srs = np.split(whole, np.cumsum([len(lr) for lr in lrs])[:-1])
        responses = []
        for lr, sr, window in zip(lrs, srs, windows):
            residual = consistency_residual(sr, lr, self.pipeline.degradation).astype(np.float32)
            bounds = np.tile(np.array([window.low, window.high], np.float32), (len(lr), 1))
            responses.append(PlaneResponse(denormalize(sr, window), residual[:, None], bounds))
        return responses

    def _options(self, request: PlaneRequest) -> SamplingOptions:
        return SamplingOptions(
            steps=request.steps,
            seed=request.seed,
            consistency=request.consistency,
            tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
        )


def open_service(
    bundle_dir,
    engine: str = "ort",
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
) -> PlaneService:
    """A PlaneService over the bundle at ``bundle_dir`` on ``engine`` (medsr.engine.sessions.ENGINES); requests
    whose image arrays need more than ``max_request_bytes`` are refused (None: no such bound)."""
    from medsr.bundle import load_bundle
    from medsr.engine.sessions import open_sessions

    bundle = load_bundle(bundle_dir)
    sessions = open_sessions(bundle, engine, device=device, threads=threads, precision=precision)
    return PlaneService(LatentSRPipeline(bundle, sessions), max_request_bytes=max_request_bytes)

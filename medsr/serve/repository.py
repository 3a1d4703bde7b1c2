"""A Triton model repository from a medsr bundle (``medsr-export --triton DIR``; docs/serving.md).

::

    DIR/<name>/config.pbtxt        Python backend, dynamic batching over planes, instance group, version policy
    DIR/<name>/1/model.py          medsr.serve.triton_model: the whole sampler loop in-process on medsr's engine
    DIR/<name>/1/bundle/           the bundle's manifest, graphs and NOTICE (or a ``bundle`` parameter naming it)

Why one Python-backend model and not an ensemble: an ensemble is a DAG, so the sampler's loop over timesteps cannot
live in one, and a model calling the denoiser per step through BLS adds a request per step (docs/sources.md,
"Serving and scale-out"). The batch dimension is the plane: a request of B planes counts B toward
``max_batch_size``; Triton gathers requests of one plane size, and the model seeds every plane on its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from medsr.bundle import MANIFEST_NAME, load_bundle
from medsr.engine.precision import PRECISIONS
from medsr.engine.sessions import ENGINES
from medsr.errors import InputError, OutputError
from medsr.serve.service import DEFAULT_MAX_REQUEST_BYTES, INPUT_NAME

#: Engines a served model may run on (the PyTorch reference is no serving engine).
SERVE_ENGINES = tuple(engine for engine in ENGINES if engine != "torch")


@dataclass(frozen=True)
class RepositoryOptions:
    """What config.pbtxt says.

    ``max_batch_size``: planes per engine run; ``preferred_batch_sizes`` and ``max_queue_delay_us``: how long the
    dynamic batcher waits to gather them; ``max_queue_size``: requests waiting beyond which Triton answers at once
    "Exceeds maximum queue size" (0: unbounded); ``instances``: model instances (each its own engine sessions);
    ``threads``: intra-op threads of each instance (0: the available cores); ``max_request_bytes``: the most memory
    the image arrays of one request may need (medsr.serve.service.PlaneService; 0: no bound beyond the plane side).
    """

    name: str = "medsr"
    engine: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 0
    instances: int = 1
    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def config_pbtxt(options: RepositoryOptions, bundle_parameter: str) -> str:
    """The model configuration (protobuf text format) of a medsr model."""
    if options.engine not in SERVE_ENGINES:
        raise InputError(f"engine must be one of {', '.join(SERVE_ENGINES)}, got {options.engine!r}")
    if options.max_batch_size < 1 or options.instances < 1 or options.max_queue_size < 0:
        raise InputError("max_batch_size and instances must be >= 1, max_queue_size >= 0")
    if options.max_request_bytes < 0:
        raise InputError("max_request_bytes must be >= 0 (0: no bound)")
    allowed = PRECISIONS[options.engine]
    if options.precision not in allowed:
        raise InputError(f"engine {options.engine} runs {', '.join(allowed)}, got precision {options.precision}")
    if options.engine == "trt" and options.device != "cuda":
        raise InputError("engine trt (TensorRT) runs on a GPU: device cuda")
    if options.engine == "openvino" and options.device != "cpu":
        raise InputError("engine openvino runs on the CPU in medsr: device cpu")
    preferred = [size for size in options.preferred_batch_sizes if size <= options.max_batch_size]
    # The engines open their GPU sessions on device 0, so a GPU model is pinned there.
    kind = "KIND_GPU gpus: [ 0 ]" if options.device == "cuda" else "KIND_CPU"
    parameters = {
        "bundle": bundle_parameter,
        "engine": options.engine,
        "device": options.device,
        "precision": options.precision,
        "threads": str(options.threads),
        "max_request_bytes": str(options.max_request_bytes),
    }
    parameter_text = ",\n".join(
        f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in parameters.items()
    )
    return f"""name: "{options.name}"
backend: "python"
max_batch_size: {options.max_batch_size}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ -1, -1 ] }}
]
output [
  {{ name: "SR" data_type: TYPE_FP32 dims: [ -1, -1 ] }},
  {{ name: "RESIDUAL" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "WINDOW" data_type: TYPE_FP32 dims: [ 2 ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(size) for size in preferred)} ]
  max_queue_delay_microseconds: {options.max_queue_delay_us}
  default_queue_policy {{ timeout_action: REJECT max_queue_size: {options.max_queue_size} }}
}}
instance_group [ {{ kind: {kind} count: {options.instances} }} ]
parameters [
{parameter_text}
]
"""


def write_repository(
    bundle_dir, repository, options: RepositoryOptions = RepositoryOptions(), copy_bundle: bool = True
) -> Path:
    """Write the model ``options.name`` of the bundle at ``bundle_dir`` into the Triton model repository
    ``repository`` (created if missing; an existing model of that name is refused). Returns the model directory.

    ``copy_bundle``: copy the manifest, graphs and NOTICE to ``<name>/1/bundle`` (a self-contained repository);
    otherwise config.pbtxt names the bundle's absolute path (the same machine only, as medsr-serve does).
    """
    bundle = load_bundle(bundle_dir)
    model_dir = Path(repository) / options.name
    if model_dir.exists():
        raise OutputError(f"{model_dir}: exists; remove it or pick another repository")
    version_dir = model_dir / "1"
    try:
        version_dir.mkdir(parents=True)
        if copy_bundle:
            target = version_dir / "bundle"
            target.mkdir()
            files = [MANIFEST_NAME, *(entry.file for entry in bundle.graphs.values())]
            files += [name for name in ("NOTICE", "LICENSE") if (bundle.root / name).is_file()]
            for name in files:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle.root / name, target / name)
            bundle_parameter = "bundle"
        else:
            bundle_parameter = str(Path(bundle.root).resolve())
        (model_dir / "config.pbtxt").write_text(config_pbtxt(options, bundle_parameter), encoding="utf-8")
        shutil.copy2(Path(__file__).with_name("triton_model.py"), version_dir / "model.py")
    except OSError as exc:
        raise OutputError(f"{model_dir}: cannot write the model repository: {exc.strerror or exc}") from exc
    return model_dir

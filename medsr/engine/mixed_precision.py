"""Mixed-precision ONNX graphs: fp16 or bf16 everywhere but a few fp32 *islands*, for strongly typed engines
(TensorRT 11, whose precision is the graph's own types) and for the layer pins of weakly typed ones (TensorRT 10.x).

Islands are found in the graph's structure, widened level by level (:data:`ISLAND_LEVELS`, each level includes the
ones before):

- ``timestep-embedding``: the sinusoidal embedding of the denoiser's ``timestep`` (diffusers'
  ``get_timestep_embedding``: the timestep times the frequencies, Sin, Cos, Concat) through the first Gemm/MatMul of
  the time MLP. In reduced precision, 999 x freq cannot be represented closely enough: at t = 999, its only step,
  the embedding of the default model is off on its +-1 scale by 0.14 in fp16 (ONNX Runtime's fp16 run; 0.20
  emulated) and by 1.53 in bf16 (emulated; 999 itself rounds to 1000), and equal to fp32 with the island
  (tests/test_mixed_precision.py measures it);
- ``time-path``: every node computed from the timestep alone (the whole time MLP and each block's projection of it);
- ``normalization``: every normalization node (InstanceNormalization, GroupNormalization, LayerNormalization; a
  GroupNorm exports as Reshape, InstanceNormalization, Reshape, Mul, Add) with the Reshape before it and the
  Reshape/Mul/Add chain after it.

Which level a graph gets is decided by measurement (:func:`decide_islands`): the mixed graph against the fp32 graph
on the bundle's own validation inputs (:func:`validation_feeds`), through the parity gate of
medsr.engine.precision; when no level passes, the graph stays fp32. The mixed graph is measured through its
emulation (:func:`emulate`), run by ONNX Runtime on the CPU: an fp32 graph in which every tensor that is fp16/bf16
in the mixed graph holds values rounded to it where they are produced (weights, the graph inputs that reduced nodes
read, each reduced node's outputs) while the islands compute unrounded, as a GPU engine does whose kernels read and
write fp16/bf16 tensors and accumulate in fp32. The rounding is ONNX Runtime's Cast (to nearest, ties to even); the
bf16 weights are rounded in NumPy bitwise as that Cast does (:func:`bf16_bits`). It rounds every intermediate
tensor, also those a fusing engine keeps in fp32 inside one kernel. The mixed graph itself is not run:

- bf16: ONNX Runtime's CPU provider refuses it (INVALID_GRAPH: opset 17's Conv and Cos take no bfloat16, measured
  with onnxruntime 1.32.0 on the default model); TensorRT's parser does not check those opset type constraints;
- fp16: ONNX Runtime runs it, but hardly in fp16 storage. Measured with onnxruntime 1.32.0 on a 2-core Xeon without
  AVX-512 FP16: it has no fp16 kernel for the arithmetic of the default model (only Concat and Reshape keep fp16
  outputs), runs the rest in fp32 between Casts it inserts, and drops the fp32 -> fp16 -> fp32 Cast pairs between
  such nodes, so apart from the weights few tensors are rounded. An input scaled by 2^18 and back comes out exact
  where fp16 storage overflows to inf (tests/test_mixed_precision.py). On the default denoiser with the
  timestep-embedding islands (PSNR over its validation inputs): real fp16 run vs fp32 88.1 dB, emulation vs fp32
  81.0 dB, emulation vs real fp16 run 81.7 dB (75.2, 71.6 and 78.4 dB without islands). The emulation is the
  closer stand-in for an engine that stores fp16 and does not depend on which fp16 kernels the CPU has, so fp16 is
  measured emulated too.

The writer is hand-written rather than onnxconverter-common's ``convert_float_to_float16(node_block_list=...)``:
measured on the default denoiser (onnxconverter-common 1.16.0), that converter casts every edge between two
blocked nodes to fp16 and back, so an island is not fp32 inside (its embedding was off by 0.20, worse than no
island), and it produced an invalid graph around Resize unless the graph's value_info was dropped first. It also
has no bf16.

onnx and onnxruntime are imported in the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

#: ONNX TensorProto element types (onnx.TensorProto.FLOAT, FLOAT16, BFLOAT16).
FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16
REDUCED_TYPES = {"fp16": FLOAT16, "bf16": BFLOAT16}
ISLAND_LEVELS = ("timestep-embedding", "time-path", "normalization")
#: how :func:`decide_islands` measures a mixed graph; changed whenever the measurement changes (the emulation, the
#: validation inputs, the gate), so that decisions kept in the plan cache by an older method are made again
DECISION_METHOD = "emulated-storage-v2"
TIMESTEP = "timestep"
NORMALIZATIONS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")
#: Inputs that keep their own type whatever the node's precision (index by op): Resize's roi and scales.
FIXED_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


@dataclass(frozen=True)
class IslandDecision:
    """What the parity gate chose for one graph.

    Attributes:
        precision: the reduced precision kept (``fp16``/``bf16``), or ``fp32`` when no level passed.
        level: the last level of ISLAND_LEVELS in the islands ("" when none, ``fp32`` when falling back).
        fp32_nodes: the names of the nodes kept fp32 (empty when the whole graph is fp32).
        parity_db: {level: PSNR of the mixed graph vs fp32, dB} for every level measured, in order.
        note: how it was measured, or why it was not.
    """

    precision: str
    level: str
    fp32_nodes: tuple[str, ...]
    parity_db: dict
    note: str

    def to_dict(self) -> dict:
        return {**asdict(self), "fp32_nodes": list(self.fp32_nodes)}


def _nodes_from(graph, sources: Iterable[str], stop_ops: tuple[str, ...] = ()) -> list:
    """The nodes reached forward from the tensors ``sources``, in graph order; a node of ``stop_ops`` is included
    but not followed."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reached, frontier = set(), list(sources)
    while frontier:
        for node in consumers.get(frontier.pop(), ()):
            if node.name not in reached:
                reached.add(node.name)
                if node.op_type not in stop_ops:
                    frontier.extend(node.output)
    return [node for node in graph.node if node.name in reached]


def _timestep_only(graph) -> set[str]:
    """Names of the nodes whose values depend on no graph input but the timestep (constants count as none; a
    shape is not a value: the ones broadcasting the timestep to the batch take the sample's Shape)."""
    others = [i.name for i in graph.input if i.name != TIMESTEP]
    tainted = {node.name for node in _nodes_from(graph, others, ("Shape", "Size"))}
    return {node.name for node in graph.node if node.name not in tainted}


def _with_constant_producers(graph, names: set[str], allowed: set[str]) -> set[str]:
    """``names`` plus, transitively, the producers in ``allowed`` of their inputs (so the Constant and shape nodes
    that feed an island are in it, not cast at its border)."""
    producer = {output: node for node in graph.node for output in node.output}
    by_name = {node.name: node for node in graph.node}
    result, frontier = set(names), list(names)
    while frontier:
        for tensor in by_name[frontier.pop()].input:
            node = producer.get(tensor)
            if node is not None and node.name in allowed and node.name not in result:
                result.add(node.name)
                frontier.append(node.name)
    return result


def timestep_embedding(graph) -> set[str]:
    """The timestep-embedding island: from the ``timestep`` input through Sin/Cos to the first Gemm/MatMul of the
    time MLP, inclusive, among the nodes that depend on the timestep alone; empty without a timestep input."""
    if TIMESTEP not in {i.name for i in graph.input}:
        return set()
    alone = _timestep_only(graph)
    reached = {n.name for n in _nodes_from(graph, [TIMESTEP], ("Gemm", "MatMul")) if n.name in alone}
    return _with_constant_producers(graph, reached, alone)


def time_path(graph) -> set[str]:
    """Every node reached from the timestep that depends on it alone (the time MLP and its per-block projections)."""
    if TIMESTEP not in {i.name for i in graph.input}:
        return set()
    alone = _timestep_only(graph)
    reached = {n.name for n in _nodes_from(graph, [TIMESTEP]) if n.name in alone}
    return _with_constant_producers(graph, reached, alone)


def normalization_neighbourhood(graph) -> set[str]:
    """Every normalization node, the Reshape that feeds it and the Reshape/Mul/Add chain (one consumer each, at
    most three nodes) that follows it: the whole of an exported GroupNorm."""
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = set()
    for node in graph.node:
        if node.op_type not in NORMALIZATIONS:
            continue
        names.add(node.name)
        before = producer.get(node.input[0])
        if before is not None and before.op_type == "Reshape":
            names.add(before.name)
        current = node
        for _ in range(3):
            following = consumers.get(current.output[0], [])
            if len(following) != 1 or following[0].op_type not in ("Reshape", "Mul", "Add"):
                break
            current = following[0]
            names.add(current.name)
    return names


LEVEL_FINDERS = {
    "timestep-embedding": timestep_embedding,
    "time-path": time_path,
    "normalization": normalization_neighbourhood,
}


def islands(model, level: str) -> tuple[str, ...]:
    """The fp32 nodes of ``level`` (and of every level before it) that read or write a float tensor (shape
    arithmetic has no precision to keep), in graph order."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    floats = {v.name for v in (*graph.input, *graph.output, *graph.value_info) if v.type.tensor_type.elem_type == FLOAT}
    floats |= {t.name for t in graph.initializer if t.data_type == FLOAT}
    levels = ISLAND_LEVELS[: ISLAND_LEVELS.index(level) + 1]
    names = set().union(*(LEVEL_FINDERS[name](graph) for name in levels))
    return tuple(n.name for n in graph.node if n.name in names and floats & {*n.input, *n.output})


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of float32 ``values`` as ONNX Runtime's Cast(to=BFLOAT16) writes them: rounded to
    nearest, ties to even, overflow to +-inf, subnormals kept, NaN a quiet NaN of its sign (0x7FC0/0xFFC0); bitwise
    equal to that Cast (tests/test_mixed_precision.py checks it on random bit patterns and ties)."""
    values = np.ascontiguousarray(values, np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def _reduced_tensor(tensor, elem_type: int, name: str):
    """``tensor`` (a float32 TensorProto) as fp16 (finite: clipped to +-65504) or bf16 (:func:`bf16_bits`), named
    ``name``."""
    from onnx import helper, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    if elem_type == FLOAT16:
        return numpy_helper.from_array(np.clip(values, -65504, 65504).astype(np.float16), name)
    return helper.make_tensor(name, BFLOAT16, values.shape, bf16_bits(values).tobytes(), raw=True)


def write_mixed(model, fp32_nodes: Iterable[str], reduced: str):
    """A copy of ``model`` (onnx.ModelProto, fp32) whose float tensors are ``reduced`` (``fp16``/``bf16``) except
    those computed by ``fp32_nodes``, with a Cast on each edge that crosses an island's border, and float32 graph
    inputs and outputs (the engine feeds and reads float32). Float initializers and Constant/ConstantOfShape values
    of reduced nodes are stored reduced (a copy when fp32 nodes read them too); Casts to float in reduced nodes cast
    to the reduced type. The result passes onnx.checker and strict shape inference."""
    import onnx
    from onnx import helper

    low = REDUCED_TYPES[reduced]
    model = onnx.shape_inference.infer_shapes(model)  # a new model: the caller's is not changed
    graph = model.graph
    keep = set(fp32_nodes)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    initializers = {t.name: t for t in graph.initializer}
    types.update({name: t.data_type for name, t in initializers.items()})
    current = {i.name: types[i.name] for i in graph.input}  # the element type each tensor has in the new graph
    copies: dict[tuple[str, int], str] = {}  # (tensor, element type) -> its name in that type
    reduced_inits: dict[str, object] = {}
    nodes = []

    def as_type(tensor: str, elem_type: int) -> str:
        if (tensor, elem_type) in copies:
            return copies[(tensor, elem_type)]
        if tensor in initializers and tensor not in current:
            name = f"{tensor}.{reduced}" if elem_type == low else tensor
            if elem_type == low:
                reduced_inits[name] = _reduced_tensor(initializers[tensor], low, name)
        elif current.get(tensor, elem_type) == elem_type:
            name = tensor
        else:
            name = f"{tensor}.{'fp32' if elem_type == FLOAT else reduced}"
            nodes.append(helper.make_node("Cast", [tensor], [name], name=f"{name}.cast", to=elem_type))
        copies[(tensor, elem_type)] = name
        return name

    for node in graph.node:
        precision = FLOAT if node.name in keep else low
        fixed = FIXED_INPUTS.get(node.op_type, ())
        for index, tensor in enumerate(node.input):
            if tensor and index not in fixed and types.get(tensor) == FLOAT:
                node.input[index] = as_type(tensor, precision)
        if precision == low:
            for attribute in node.attribute:
                if attribute.name == "to" and node.op_type == "Cast" and attribute.i == FLOAT:
                    attribute.i = low
                if attribute.name == "value" and attribute.t.data_type == FLOAT:
                    attribute.t.CopyFrom(_reduced_tensor(attribute.t, low, attribute.t.name))
        for tensor in node.output:
            if types.get(tensor) == FLOAT:
                current[tensor] = precision
        nodes.append(node)
    for output in graph.output:
        if current.get(output.name, FLOAT) != FLOAT:
            inner = f"{output.name}.{reduced}"
            for node in nodes:
                node.input[:] = [inner if name == output.name else name for name in node.input]
                node.output[:] = [inner if name == output.name else name for name in node.output]
            nodes.append(helper.make_node("Cast", [inner], [output.name], name=f"{output.name}.cast", to=FLOAT))
    read = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.node[:], graph.value_info[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend([*kept, *(t for name, t in reduced_inits.items() if name in read)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def emulate(mixed, reduced: str):
    """An fp32 graph computing what ``mixed`` (a :func:`write_mixed` graph in ``reduced``) computes on a GPU engine,
    whose kernels read and write ``reduced`` tensors but accumulate in fp32: ``reduced`` storage, fp32 arithmetic.

    Each ``reduced`` tensor becomes a float32 tensor holding ``reduced`` values: initializers and Constant/
    ConstantOfShape values are widened (exactly), Casts to ``reduced`` cast to float instead, and every ``reduced``
    output of a node is rounded where it is produced by a Cast(to=reduced) -> Cast(to=FLOAT) round trip, which
    ONNX Runtime's CPU provider runs for fp16 and bf16 (round to nearest even). The border Casts of the islands and
    of the graph inputs are such nodes, so what enters a reduced node is rounded; island (fp32) nodes and their
    tensors are untouched. It rounds every intermediate tensor, also those a fusing engine keeps in fp32 inside one
    kernel (a Conv's output before the Add fused with it)."""
    import onnx
    from onnx import helper

    low = REDUCED_TYPES[reduced]
    model = onnx.shape_inference.infer_shapes(mixed, strict_mode=True)  # a new model: ``mixed`` is not changed
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    nodes = []
    for node in graph.node:
        _widen_attributes(node, low)
        nodes.append(node)
        for index, tensor in enumerate(node.output):
            if types.get(tensor) == low:
                unrounded, stored = f"{tensor}.unrounded", f"{tensor}.stored"
                node.output[index] = unrounded
                nodes.append(helper.make_node("Cast", [unrounded], [stored], name=f"{tensor}.round", to=low))
                nodes.append(helper.make_node("Cast", [stored], [tensor], name=f"{tensor}.widen", to=FLOAT))
    initializers = [_widened(t) if t.data_type == low else t for t in graph.initializer]
    del graph.node[:], graph.value_info[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _widen_attributes(node, low: int) -> None:
    """``node`` with a Cast to ``low`` made a Cast to float and a ``low`` ``value`` tensor (Constant,
    ConstantOfShape) widened to float32, in place."""
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == low:
            attribute.i = FLOAT
        if attribute.name == "value" and attribute.t.data_type == low:
            attribute.t.CopyFrom(_widened(attribute.t))


def _widened(tensor):
    """``tensor`` (an fp16 or bf16 TensorProto) as float32, same name and values (widening is exact)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def validation_feeds(manifest, graph: str) -> list[dict[str, np.ndarray]]:
    """The inputs of ``graph`` at the shapes the bundle was validated on at export (``validation.onnx_vs_torch``),
    seeded: standard normal (an image clipped to [-1, 1]), timesteps from the last training timestep (the first
    step of every schedule, and the largest argument of the embedding) down to 0 across the batch."""
    records = (manifest.validation or {}).get("onnx_vs_torch", {}).get(graph) or ()
    last = manifest.scheduler.num_train_timesteps - 1
    feeds = []
    for seed, record in enumerate(records):
        rng = np.random.default_rng(seed)
        arrays = {}
        for name, shape in record["input_shapes"].items():
            if name == TIMESTEP:
                arrays[name] = np.linspace(last, 0, shape[0]).astype(np.float32)
            else:
                values = rng.standard_normal(tuple(shape), dtype=np.float32)
                arrays[name] = np.clip(values, -1, 1) if name == "image" else values
        feeds.append(arrays)
    return feeds


def run_cpu(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model`` (onnx.ModelProto) run once by ONNX Runtime on the CPU (one thread: it runs next to the build);
    the outputs as float32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(out, np.float32) for out in session.run(None, feeds)]


def mixed_parity(model, fp32_nodes: Iterable[str], reduced: str, feeds: list[dict], reference: list) -> float:
    """The lowest PSNR (dB) over every output and every feed of the mixed graph, run as its :func:`emulate`
    (``reduced`` storage, fp32 arithmetic), against the fp32 outputs ``reference`` (one list per feed)."""
    from medsr.engine.compare import compare_arrays

    emulated = emulate(write_mixed(model, fp32_nodes, reduced), reduced)  # each works on its own copy
    scores = [
        compare_arrays(out, ref)["psnr_db"]
        for feed, refs in zip(feeds, reference)
        for out, ref in zip(run_cpu(emulated, feed), refs)
    ]
    return min(scores)


def decide_islands(model, reduced: str, feeds: list[dict], threshold_db: float | None = None) -> IslandDecision:
    """The narrowest island level whose mixed graph passes the parity gate on ``feeds`` (medsr.engine.precision.
    first_passing, its threshold and margin; ``threshold_db`` overrides the threshold), else fp32; measured by
    :func:`mixed_parity` (emulated, for fp16 and bf16 alike). Levels that add no node to the one before are skipped.
    Without ``feeds`` the graph keeps the first level, unmeasured."""
    from medsr.engine.precision import AUTO_THRESHOLD_DB, first_passing

    candidates: dict[str, tuple[str, ...]] = {}
    for level in ISLAND_LEVELS:
        nodes = islands(model, level)
        if not candidates or nodes != list(candidates.values())[-1]:
            candidates[level] = nodes
    first = next(iter(candidates))
    if not feeds:
        return IslandDecision(reduced, first, candidates[first], {}, "not measured: no validation inputs")
    reference = [run_cpu(model, feed) for feed in feeds]
    threshold = AUTO_THRESHOLD_DB if threshold_db is None else threshold_db
    chosen, parity = first_passing(
        list(candidates), lambda level: mixed_parity(model, candidates[level], reduced, feeds, reference), threshold
    )
    note = f"emulated: {reduced} storage, fp32 arithmetic, ONNX Runtime CPU, {len(feeds)} validation input(s), vs fp32"
    if chosen is None:
        return IslandDecision("fp32", "fp32", (), parity, note)
    return IslandDecision(reduced, chosen, candidates[chosen], parity, note)

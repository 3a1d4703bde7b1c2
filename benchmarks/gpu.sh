#!/usr/bin/env bash
# One prepared GPU run: install carried wheels, record what the machine has, run the GPU tests, benchmark every GPU
# engine that can run here, and write the JSON + markdown report. Takes a few minutes on an H100/H200.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [quick]  (default OUT_DIR: $OUT if set, else benchmarks/results)
#
# "quick" (about 2 minutes) benchmarks the paper-size model only, with 2 repeats.
#
# Nothing is downloaded. Wheels in benchmarks/wheels/ (pure-Python ones the image lacks: diffusers, nibabel,
# onnxslim, importlib_metadata; a tensorrt or onnxruntime-gpu wheel if someone carries one) are installed with
# --no-index. Engines whose packages are missing are skipped and the skip is written to gpu-skipped.txt and the
# report, never silently: eager PyTorch fp32 (cuDNN's default TF32 convolutions), fp16 and bf16 autocast always run;
# ONNX Runtime CUDA needs onnxruntime-gpu; native TensorRT needs tensorrt + cuda-python.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results}}
if [ "${2:-}" = quick ]; then SCOPE=(--preset latentsr-medvae-4x3 --repeats 2); else
  SCOPE=(--preset latentsr-medvae-4x3 --preset default --repeats 3); fi
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MEDSR_CACHE=${MEDSR_CACHE:-/tmp/medsr-cache}
SKIPPED="$OUT_DIR/gpu-skipped.txt"
: >"$SKIPPED"

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  $PY -m pip install --no-index --no-deps -q benchmarks/wheels/*.whl || echo "wheel install failed" >>"$SKIPPED"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$OUT_DIR/gpu-nvidia-smi.csv" 2>&1

$PY - "$OUT_DIR/gpu-environment.json" <<'EOF'
import importlib, json, sys
info = {}
for name in ("torch", "onnxruntime", "tensorrt", "cuda.bindings.runtime", "diffusers", "nibabel", "onnxslim"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "importable")
    except Exception as exc:  # report, don't fail: this file says what exists
        info[name] = f"missing ({type(exc).__name__})"
import torch, onnxruntime
info["cuda_available"] = torch.cuda.is_available()
info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
info["onnxruntime_providers"] = onnxruntime.get_available_providers()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

ENGINES=(--engine torch --engine torch:fp16 --engine torch:bf16)
if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  ENGINES+=(--engine ort)
else
  echo "ort (CUDA provider): onnxruntime-gpu is not installed (the image has the CPU onnxruntime)" >>"$SKIPPED"
fi
if $PY -c "import tensorrt, cuda.bindings.runtime"; then
  ENGINES+=(--engine trt:fp16 --engine trt:fp32)
else
  echo "trt (native TensorRT fp16/fp32): tensorrt is not installed and cannot be downloaded here" >>"$SKIPPED"
fi

echo "== GPU tests"
$PY -m pytest -q -p no:cacheprovider tests/test_trt_gpu.py tests/test_trt_gpu_padding.py tests/test_trt.py \
  tests/test_step_kernel.py tests/test_device_loop.py tests/test_device_loop_gpu.py 2>&1 | tail -15 | tee "$OUT_DIR/gpu-tests.txt"

echo "== benchmark: ${ENGINES[*]}"
$PY -c "from medsr.cli.bench import main; main()" --device cuda \
  "${SCOPE[@]}" "${ENGINES[@]}" --batch-size 1 --batch-size 4 --slices 4 --steps 10 \
  --work-dir /tmp/medsr-bench -o "$OUT_DIR" --tag gpu 2>"$OUT_DIR/gpu-bench.log"
status=$?
tail -5 "$OUT_DIR/gpu-bench.log"
for engine in ort trt; do  # host stages overlapped with the GPU engine within one volume, and not
  if printf '%s\n' "${ENGINES[@]}" | grep -q "^$engine"; then
    $PY benchmarks/volume_overlap.py --engine "$engine" --device cuda --steps 1 --repeats 5 --results "$OUT_DIR" \
      --tag "volume-overlap-gpu-$engine" >"$OUT_DIR/volume-overlap-gpu-$engine.log" 2>&1 || status=1
    # the denoising loop alone: through the host, on the device step by step, and (TensorRT) as one CUDA graph
    $PY benchmarks/device_loop.py --engine "$engine" --device cuda --batch-size 4 --steps 10 --repeats 21 \
      --out "$OUT_DIR/device-loop-gpu-$engine.json" >"$OUT_DIR/device-loop-gpu-$engine.log" 2>&1 || status=1
  fi
done
echo "== skipped"
cat "$SKIPPED"
if [ -f "$OUT_DIR/gpu.md" ]; then
  { echo; echo "Skipped on this machine:"; sed 's/^/- /' "$SKIPPED"; } >>"$OUT_DIR/gpu.md"
  cat "$OUT_DIR/gpu.md"
fi
exit $status

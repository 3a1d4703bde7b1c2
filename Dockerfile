# medsr GPU runtime: NVIDIA's TensorRT image (CUDA, cuDNN, TensorRT and its Python bindings), medsr with the GPU
# engine packages and the bundled default model, run as a non-root user with medsr-infer as the entry point.
#
#   docker build -t medsr .
#   docker run --gpus all -v "$PWD:/data" medsr scan.nii.gz -o scan_sr.nii.gz --engine trt --device cuda
#
# One CUDA major in the whole image: the 25.01 image is CUDA 12.8 with TensorRT 10.8 and cuDNN 9, so every GPU
# package is the gpu-cu12 extra's CUDA 12 build (pyproject.toml): onnxruntime-gpu < 1.27 (1.27 and later are CUDA 13
# builds whose CUDA provider cannot load here) and cuda-python 12.x (13.x needs a driver >= 580). The host needs an
# NVIDIA driver for CUDA 12.8: R570 or newer (NVIDIA's 25.01 release notes list the older data-center branches that
# also run it through forward compatibility) and the NVIDIA Container Toolkit. For a CUDA 13 host stack use the
# gpu-cu13 extra on a driver >= 580 instead (docs/sources.md, "GPU engines").
#
# TensorRT plans are built on first use for the GPU the container runs on and cached in MEDSR_CACHE (mount a volume
# there to keep them across containers); a plan built for another GPU or TensorRT version is rebuilt.
FROM nvcr.io/nvidia/tensorrt:25.01-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MEDSR_CACHE=/home/medsr/.cache/medsr

WORKDIR /opt/medsr
COPY pyproject.toml README.md ./
COPY medsr ./medsr

# The core dependencies name the CPU onnxruntime, which must never sit beside onnxruntime-gpu (one import package):
# install medsr without dependencies, then the runtime packages with the gpu-cu12 extra's instead, without their
# [cuda,cudnn] wheels and CuPy without [ctk]: the image has CUDA 12.8 (NVRTC included) and cuDNN 9 (the extra's
# versions, without the duplicate libraries). The image's own tensorrt (10.8, CUDA 12) stands for the extra's
# tensorrt-cu12. The check imports the whole GPU chain at build time: TensorRT 10.x, cuda.bindings 12.x, ONNX
# Runtime with its CUDA provider listed, and the provider's libraries all found in the image (ldd; only the driver's
# libcuda comes from the host at run time); CuPy, whose import needs that driver, is checked installed with the
# NVRTC 12 it compiles the sampler-step kernel with.
RUN python3 -m pip install --no-deps . \
    && python3 -m pip install "numpy>=1.24" "onnx>=1.15" "nibabel>=5.0" "click>=8.1" "tqdm>=4.60" \
        "onnxruntime-gpu>=1.21,<1.27" "cuda-python>=12.8,<13" "cupy-cuda12x>=13.6,<15" \
    && python3 -c "import medsr.engine.trt, medsr.engine.cuda, tensorrt, onnxruntime, ctypes, importlib.metadata; \
import cuda.bindings, cuda.bindings.runtime; \
ctypes.CDLL('libnvrtc.so.12'); \
print('CuPy', importlib.metadata.version('cupy-cuda12x'), 'with NVRTC 12'); \
assert tensorrt.__version__.startswith('10.'), tensorrt.__version__; \
assert cuda.bindings.__version__.startswith('12.'), cuda.bindings.__version__; \
providers = onnxruntime.get_available_providers(); \
assert 'CUDAExecutionProvider' in providers, providers; \
print('medsr GPU chain (CUDA 12): TensorRT', tensorrt.__version__, '| cuda.bindings', cuda.bindings.__version__, \
'| onnxruntime', onnxruntime.__version__, providers)" \
    && provider="$(python3 -c 'import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / "capi")')" \
    && missing="$(ldd "$provider/libonnxruntime_providers_cuda.so" | grep 'not found' | grep -v 'libcuda\.so' || true)" \
    && if [ -n "$missing" ]; then echo "onnxruntime-gpu's CUDA provider cannot load in this image: $missing" >&2; exit 1; fi

RUN useradd --create-home --uid 1000 medsr && mkdir -p /data && chown medsr /data
USER medsr
WORKDIR /data

ENTRYPOINT ["medsr-infer"]
CMD ["--help"]

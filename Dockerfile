# medsr GPU runtime: NVIDIA's TensorRT image (CUDA, cuDNN, TensorRT and its Python bindings), medsr with the GPU
# engine packages and the bundled default model, run as a non-root user with medsr-infer as the entry point.
#
#   docker build -t medsr .
#   docker run --gpus all -v "$PWD:/data" medsr scan.nii.gz -o scan_sr.nii.gz --engine trt --device cuda
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
# install medsr without dependencies, then the runtime packages with the gpu extra's instead. The image's own
# tensorrt already satisfies the extra's tensorrt requirement.
RUN python3 -m pip install --no-deps . \
    && python3 -m pip install "numpy>=1.24" "onnx>=1.15" "nibabel>=5.0" "click>=8.1" "tqdm>=4.60" \
        "onnxruntime-gpu>=1.17" "cuda-python>=12.0" \
    && python3 -c "import medsr.engine.trt, tensorrt, onnxruntime; print('medsr engine ready, TensorRT', tensorrt.__version__)"

RUN useradd --create-home --uid 1000 medsr && mkdir -p /data && chown medsr /data
USER medsr
WORKDIR /data

ENTRYPOINT ["medsr-infer"]
CMD ["--help"]

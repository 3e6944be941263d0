# syntax=docker/dockerfile:1
# rnnserve server images. Two targets, each with exactly one onnxruntime flavour:
#   docker build -t rnnserve:cpu .                  the CPU image (`cpu`, the last stage, is the default)
#   docker build --target gpu -t rnnserve:gpu .     onnxruntime-gpu; run it with --gpus all and --device cuda
# Both export the built-in example models into /models at build time and serve them by default:
#   docker run --rm -p 50051:50051 rnnserve:cpu
#   docker run --rm -p 50051:50051 -v "$PWD/model_repository:/models:ro" rnnserve:cpu   (your own models)
# Extra `rnnserve serve` flags replace CMD, so repeat --repository:
#   docker run --rm -p 50051:50051 rnnserve:cpu --repository /models --port 50051 --session-ttl 120

ARG PYTHON_IMAGE=python:3.11-slim
# The CPU image takes torch from PyTorch's CPU index: on Linux, PyPI's torch is the CUDA build (several GB
# of nvidia-* wheels), which the CPU image has no use for.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---- base: interpreter, user, and how the server is run (both targets inherit it) -----------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && useradd --create-home --uid 10001 --user-group rnnserve
EXPOSE 50051
# Exec form throughout: `rnnserve serve` is PID 1 and gets docker stop's SIGTERM itself (it drains for
# --grace seconds, then exits 0).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["rnnserve", "health", "--address", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["rnnserve", "serve"]
CMD ["--repository", "/models", "--port", "50051"]

# ---- gpu: onnxruntime-gpu (never beside onnxruntime) and a CUDA torch -------------------------------------
FROM base AS gpu
COPY . /src
# torch from PyPI is the CUDA build: `--device cuda` keeps session state in CUDA tensors, so the CPU build
# will not do. On PyPI, the pinned torch and onnxruntime-gpu are built for the same CUDA major version (13)
# and share one set of nvidia-* wheels (CUDA runtime, cuBLAS, cuDNN, ...); the driver comes from the NVIDIA
# Container Toolkit at run time. Registering the wheels' library folders with the dynamic loader lets
# onnxruntime's CUDA provider find them without LD_LIBRARY_PATH.
RUN pip install -c /src/constraints.txt '/src[runtime,gpu,export]' 'onnxruntime-gpu[cuda,cudnn]' \
 && find /opt/venv -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
      > /etc/ld.so.conf.d/rnnserve-nvidia-wheels.conf \
 && ldconfig
RUN rnnserve export --all-examples --repository /models --format onnx
USER rnnserve
WORKDIR /home/rnnserve

# ---- cpu (default): onnxruntime and a CPU torch -----------------------------------------------------------
FROM base AS cpu
ARG TORCH_INDEX_URL
# torch before the project, in a layer of its own: the project's torch requirement is then already met, so
# pip never resolves torch on PyPI, and a source change does not download torch again.
COPY constraints.txt /src/constraints.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" -c /src/constraints.txt torch
COPY . /src
RUN pip install -c /src/constraints.txt '/src[server,export]'
RUN rnnserve export --all-examples --repository /models --format onnx
USER rnnserve
WORKDIR /home/rnnserve

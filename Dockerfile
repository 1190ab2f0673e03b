# syntax=docker/dockerfile:1
#
# clipserve images, one Dockerfile, three targets:
#
#   server-gpu (the default)  CUDA 13 runtime + cuDNN 9 base, onnxruntime-gpu
#   server-cpu                Python slim base, onnxruntime (CPU)
#   export                    torch + open_clip: `clipserve export` writes a model repository
#
#   docker build -t clipserve:0.1.0-gpu .
#   docker build --target server-cpu -t clipserve:0.1.0-cpu .
#   docker build --target export -t clipserve-export:0.1.0 .
#
# The serving images hold no torch (docker/check-server.sh fails the build otherwise), run as
# user 10001, keep no HEALTHCHECK (Kubernetes probes grpc.health.v1 itself) and need no writable
# path but /tmp: they run with a read-only root filesystem. Python packages are pinned by
# .ci/requirements.txt, the versions CI tests. docker/install-server.sh is the install step CI
# runs too (.ci/k8s.sh), so the image and the CI check cannot drift apart.

# No HEALTHCHECK in any image: the kubelet probes grpc.health.v1 (k8s/), the export runs once.
# checkov:skip=CKV_DOCKER_2:health is probed by Kubernetes over grpc.health.v1, not by Docker
# checkov:skip=CKV_DOCKER_7:FROM uses the ARGs below, each a fixed version tag checkov cannot expand
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# -- the clipserve wheel ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY server ./server
COPY export ./export
COPY clients ./clients
RUN python -m pip wheel --no-deps --wheel-dir /dist .

# -- CPU serving environment -----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS server-cpu-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/install-server.sh docker/check-server.sh /build/
COPY .ci/requirements.txt /build/constraints.txt
COPY --from=wheel /dist/ /dist/
RUN sh /build/install-server.sh /opt/clipserve /dist/clipserve-*.whl /build/constraints.txt cpu \
    && sh /build/check-server.sh /opt/clipserve cpu

# -- GPU serving environment -----------------------------------------------------------------
FROM ${CUDA_IMAGE} AS server-gpu-venv
# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9, the libraries of CUDA_IMAGE.
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# The distribution's python3 (3.12 on Ubuntu 24.04); the base image tag fixes its release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY docker/install-server.sh docker/check-server.sh /build/
COPY .ci/requirements.txt /build/constraints.txt
COPY --from=wheel /dist/ /dist/
RUN ONNXRUNTIME_GPU_VERSION=${ONNXRUNTIME_GPU_VERSION} \
    sh /build/install-server.sh /opt/clipserve /dist/clipserve-*.whl /build/constraints.txt gpu \
    && sh /build/check-server.sh /opt/clipserve gpu

# -- export image: torch, open_clip, onnx; writes model repositories ---------------------------
# Runs once per model (a Job or an init container), never at request time. To keep the image
# smaller, point pip at a CPU-only torch index with --build-arg PIP_EXTRA_INDEX_URL=...: the
# constraints pin public versions, which CPU builds such as 2.14.1+cpu satisfy.
FROM ${PYTHON_IMAGE} AS export
# (an ARG is in the environment of RUN only, and only when given: it is not kept in the image)
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY .ci/requirements.txt /build/constraints.txt
COPY --from=wheel /dist/ /dist/
RUN set -- /dist/clipserve-*.whl \
    && python -m venv /opt/clipserve \
    && /opt/clipserve/bin/python -m pip install --constraint /build/constraints.txt "$1[export]" \
    && /opt/clipserve/bin/clipserve export --help >/dev/null \
    && groupadd --system --gid 10001 clipserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin clipserve
# HOME and the hub cache live on writable volumes (/tmp, /cache) under a read-only root.
ENV PATH=/opt/clipserve/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp HF_HOME=/cache/huggingface
LABEL org.opencontainers.image.title="clipserve-export" \
      org.opencontainers.image.description="Exports open_clip CLIP models to clipserve ONNX model repositories" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["clipserve"]
CMD ["export", "--help"]

# -- CPU serving image -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS server-cpu
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
RUN groupadd --system --gid 10001 clipserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin clipserve
COPY --from=server-cpu-venv /opt/clipserve /opt/clipserve
# HOME=/tmp: the only writable path (an emptyDir in Kubernetes); settings are CLIPSERVE_* vars.
ENV PATH=/opt/clipserve/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    CLIPSERVE_MODEL_REPOSITORY=/models/repository CLIPSERVE_DEVICE=cpu
LABEL org.opencontainers.image.title="clipserve" \
      org.opencontainers.image.description="gRPC inference service for CLIP on ONNX Runtime (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="python:3.12-slim-bookworm"
USER 10001:10001
WORKDIR /tmp
# 8001: gRPC (clipserve.v1.ClipService, grpc.health.v1); 8002: Prometheus /metrics;
# 8000: the OpenAI-compatible HTTP API when CLIPSERVE_HTTP_PORT=8000 (off by default)
EXPOSE 8001 8002 8000
ENTRYPOINT ["clipserve"]
CMD ["serve"]

# -- GPU serving image (the default target) ---------------------------------------------------
FROM ${CUDA_IMAGE} AS server-gpu
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 clipserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin clipserve
COPY --from=server-gpu-venv /opt/clipserve /opt/clipserve
# CUDA_CACHE_PATH: kernels JIT-compiled by the driver are cached on the writable /tmp.
ENV PATH=/opt/clipserve/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    CLIPSERVE_MODEL_REPOSITORY=/models/repository CLIPSERVE_DEVICE=cuda
LABEL org.opencontainers.image.title="clipserve" \
      org.opencontainers.image.description="gRPC inference service for CLIP on ONNX Runtime (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8001 8002 8000
ENTRYPOINT ["clipserve"]
CMD ["serve"]

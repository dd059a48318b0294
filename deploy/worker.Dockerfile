# syntax=docker/dockerfile:1
# A ddserve worker: the batching RQ worker with PyTorch and ONNX Runtime, the model zoo baked in.
#   GPU (default): docker build -f deploy/worker.Dockerfile -t ddserve-worker:gpu .
#   CPU:           docker build -f deploy/worker.Dockerfile -t ddserve-worker:cpu \
#                    --build-arg BASE_IMAGE=ubuntu:24.04 \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                    --build-arg EXTRAS=diffusers
# The GPU variant runs on a CUDA runtime + cuDNN base (what onnxruntime-gpu's CUDA provider loads);
# PyTorch's CUDA wheels bring their own CUDA libraries. Both variants use Ubuntu 24.04's Python.
# The zoo is baked in; to serve other models without rebuilding, mount a zoo folder and point
# DDSERVE_ZOO_DIR at it (docker run -v ./zoo:/zoo:ro -e DDSERVE_ZOO_DIR=/zoo ...).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Space-separated extras of pyproject.toml: ONNX Runtime's CUDA build and diffusers/transformers
# (imported pipelines: `ddserve import`, DDSERVE_MODEL_DIRS).
ARG EXTRAS="gpu diffusers"
LABEL org.opencontainers.image.title="ddserve-worker" \
      org.opencontainers.image.description="ddserve batching worker (PyTorch, ONNX Runtime)"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come with the base image's release; pinning them would break on every base rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# PyTorch first, from the index of the chosen build (CUDA or CPU): the layer that rarely changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python deploy/requirements.py worker --extra "${EXTRAS}" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY ddserve ddserve
COPY models models
COPY service service
COPY workers workers
# The zoo (models/zoo) is package data: it is installed with the package and is the default
# DDSERVE_ZOO_DIR. The sources are not needed once installed.
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src

RUN groupadd --system --gid 10001 ddserve \
    && useradd --system --uid 10001 --gid ddserve --create-home ddserve
ENV DDSERVE_LOG_JSON=true
USER 10001:10001
WORKDIR /home/ddserve
CMD ["ddserve", "worker"]

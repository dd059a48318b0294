# syntax=docker/dockerfile:1
# The ddserve gateway: FastAPI under uvicorn, without PyTorch or ONNX Runtime.
#   docker build -f deploy/gateway.Dockerfile -t ddserve-gateway .
# Its requirements are pyproject.toml's dependencies minus the worker-only ones
# (deploy/requirements.py); the project itself is installed with --no-deps on top.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Requirements first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python deploy/requirements.py gateway > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY ddserve ddserve
COPY models models
COPY service service
COPY workers workers
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import sys, service.app; assert 'torch' not in sys.modules"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ddserve-gateway" \
      org.opencontainers.image.description="ddserve REST gateway (no torch)"
RUN groupadd --system --gid 10001 ddserve \
    && useradd --system --uid 10001 --gid ddserve --create-home ddserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DDSERVE_HOST=0.0.0.0 \
    DDSERVE_PORT=8000 \
    DDSERVE_LOG_JSON=true
USER 10001:10001
WORKDIR /home/ddserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "ddserve.healthcheck"]
CMD ["ddserve", "serve", "--workers", "2"]

# syntax=docker/dockerfile:1
# jaxserve on CPU: serves the built-in demo model (random weights, written at build time) or a model you name.
#   docker build -t jaxserve:cpu .
#   docker run --rm -p 8000:8000 -p 50051:50051 jaxserve:cpu
#   curl localhost:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": "Hello", "max_tokens": 8}'
# Another model (Hugging Face directory mounted, or a hub id with the network on):
#   docker run --rm -p 8000:8000 -v /models/llama:/model jaxserve:cpu /model --config cpu-throughput
# GPU and TPU images: docker/Dockerfile.cuda, docker/Dockerfile.tpu (docs/containers.md).
ARG PYTHON_VERSION=3.11

# Stage 1: the wheel, from the repository (the same wheel `pip wheel .` builds anywhere).
FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jaxserve ./jaxserve
COPY models ./models
COPY pallas_kernels ./pallas_kernels
COPY configs ./configs
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels /src

# Stage 2: the runtime: the wheel and its dependencies, nothing of the repository.
FROM python:${PYTHON_VERSION}-slim
# JAXSERVE_EXTRA: the pyproject extra that brings the platform's jax ("" on CPU; cuda, tpu in docker/).
ARG JAXSERVE_EXTRA=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    JAXSERVE_CACHE_DIR=/var/cache/jaxserve
COPY --from=wheel /wheels /wheels
RUN set -eux; whl="$(ls /wheels/jaxserve-*.whl)"; \
    pip install "${whl}${JAXSERVE_EXTRA:+[${JAXSERVE_EXTRA}]}"; \
    rm -rf /wheels
# The demo model (tokenizer trained locally, random weights) goes into the image, so a start needs no network.
RUN python -c "from jaxserve.demo_model import ensure_demo_model; print(ensure_demo_model())"
WORKDIR /work
EXPOSE 8000 50051
# /health is 503 {"status": "starting"} until warm-up ends, then 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["jaxserve", "serve"]
CMD ["--config", "cpu", "--host", "0.0.0.0", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]

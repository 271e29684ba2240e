# make test  - create .venv if missing, install everything, build the extension, run the tests
# make demo  - the same set-up, then the main job
# make build - rebuild the extension qrkd._C after a change under csrc/

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# the stack that resolves together on Python 3.11 (DESIGN.md section 5)
STACK  := "torch==2.12.1" "torchvision==0.27.*" triton "merlinquantum==0.4.2" setuptools wheel ninja numpy
export CUDA_HOME ?= /usr/local/cuda

.PHONY: test demo build install clean bench

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(STACK)
	QRKD_SKIP_EXT=1 $(PIP) install --quiet --no-build-isolation -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.built: $(VENV)/.installed $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -m "not gpu" --durations=15 tests

# a second `make demo` continues an interrupted demo (or re-reports a finished one) instead of refusing runs/demo
demo: build
	$(PY) -m qrkd compare --data-root "$${QRKD_DATA_ROOT:-data}" --name demo $$(test -f runs/demo/run.json && echo --resume)

bench: build
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build qrkd/_C*.so qrkd/*.so $(VENV)/.built

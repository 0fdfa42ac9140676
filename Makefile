# Two entry points for a newcomer: `make demo` and `make test`. Both bootstrap .venv on a
# fresh machine that has only python3 (with venv), gcc and make; `make test` also installs Debian's
# prometheus package when promtool is missing (as root), and a second venv with numpy 2.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The runtime allows numpy 2, but nvidia-pytriton (the test Triton, in .venv) pins numpy<2. The tests that need
# no Triton also run here, against numpy 2, so nothing breaks unseen. test_deploy.py is left out: it lints
# files with tools of the test extra (hadolint, kubernetes-validate) and runs no numpy code.
NP2       := .venv-np2
NP2_STAMP := $(NP2)/.installed
NP2_TESTS := -m 'not triton and not gpu' --ignore=tests/test_deploy.py

.PHONY: demo tour test test-numpy2 prometheus lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(NP2_STAMP): pyproject.toml
	$(PYTHON) -m venv $(NP2)
	$(NP2)/bin/python -m pip install --quiet --upgrade pip
	$(NP2)/bin/python -m pip install --quiet -e . pytest pytest-aiohttp aioresponses hypothesis 'numpy>=2'
	touch $(NP2_STAMP)

demo: $(STAMP)
	$(PY) demo/run.py

tour: $(STAMP)
	$(PY) demo/run.py --tour

lint: $(STAMP)
	$(VENV)/bin/ruff check probe tests demo bench
	$(VENV)/bin/ruff format --check probe tests demo bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# promtool and prometheus for tests/test_prometheus.py (Debian's prometheus package); a no-op when present.
prometheus:
	@.ci/install-prometheus

test: lint typecheck prometheus
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-numpy2

test-numpy2: $(NP2_STAMP) prometheus
	$(NP2)/bin/python -c 'import numpy, sys; sys.exit(None if int(numpy.__version__.split(".")[0]) >= 2 else "numpy " + numpy.__version__ + " in $(NP2)")'
	$(NP2)/bin/python -m pytest -q -p no:cacheprovider $(NP2_TESTS)

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(NP2) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# `make test` creates .venv when needed, installs the project with its test extras, runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Two test processes (pytest-xdist), one per core of the CI machine, each with one torch thread
# (tests/conftest.py); TEST_PROCESSES=0 runs the suite in this process.
TEST_PROCESSES ?= 2

test: install
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist worksteal $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lethe demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info

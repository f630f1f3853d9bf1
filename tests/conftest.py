"""Shared fixtures: the tiny models of configs/test.yaml, built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_CONFIG = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
TINY_MODELS = TEST_CONFIG["models"]  # name -> spec, one per family

# One thread: the tiny models gain nothing from two, and on a busy 2-core machine two threads
# contend badly (an RWKV step went from milliseconds to half a second).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    from workflow_scripts.model_sources import materialize

    root = tmp_path_factory.mktemp("models")
    for name, spec in TINY_MODELS.items():
        materialize(spec, name, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dirs):
    """name -> adapter, for one tiny model of each family."""
    from workflow_scripts.adapters import load_adapter

    return {name: load_adapter(spec, name, tiny_model_dirs / name / "weights") for name, spec in TINY_MODELS.items()}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_adapter(request, tiny_adapters):
    return tiny_adapters[request.param]


# ----- workflow runs: Snakemake on a copy of the project ---------------------------------------------
PROJECT_PARTS = [
    "Snakefile", "rules", "workflow_scripts", "envs", "configs", "config.yaml", "profiles", "data/inputs",
    "reports/captions",
]  # fmt: skip


def copy_project(target: Path) -> Path:
    for part in PROJECT_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, target / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target / part)
    return target


def snakemake(workdir: Path, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--workflow-profile", "none", *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )


def new_checkout(tmp_path_factory) -> Path:
    """A fresh copy of the project, with ../shared beside it where this checkout has one."""
    root = tmp_path_factory.mktemp("checkout")
    if SHARED.is_dir():  # configs that read ../shared find it beside the copy too
        (root / "shared").symlink_to(SHARED)
    return copy_project(root / "main")


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return new_checkout(tmp_path_factory)


@pytest.fixture(scope="session")
def finished_run(project):
    """The tiny config run once to the end; later tests read its outputs or plan reruns from it."""
    result = snakemake(project, "--configfile", "configs/test.yaml", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished tiny run (Snakemake's metadata and timestamps kept), free to change."""
    copy = tmp_path / "main"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy

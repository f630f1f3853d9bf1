"""A killed job leaves nothing Snakemake would accept, a rerun completes it, and the same seeds give
the same tables."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import snakemake
from workflow_scripts.activations import read_layer

pytestmark = pytest.mark.workflow


def test_killed_extraction_leaves_no_output_and_a_rerun_completes_it(run_copy):
    target = run_copy / "data/activations/rwkv-tiny/smoke.parquet"
    target.unlink()
    process = subprocess.Popen(
        # Targets before --configfile, which would take them for more config files.
        [sys.executable, "-m", "snakemake", str(target.relative_to(run_copy)), "--cores", "1",
         "--workflow-profile", "none", "--configfile", "configs/test.yaml"],
        cwd=run_copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(target.parent.glob(".smoke.parquet.*.tmp")):  # the writer has started
        assert process.poll() is None, "snakemake ended before the extraction started writing"
        assert time.monotonic() < deadline, "the extraction never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # snakemake and its job, mid-write
    process.wait()
    assert not target.exists()
    assert snakemake(run_copy, "--unlock", "--configfile", "configs/test.yaml").returncode == 0
    rerun = snakemake(
        run_copy, str(target.relative_to(run_copy)), "--rerun-incomplete", "--configfile", "configs/test.yaml"
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows, vectors = read_layer(target, 0)
    assert len(rows) == 16 and vectors.shape[0] == 16


def test_same_seeds_give_identical_tables(run_copy, finished_run):
    tables = [
        "data/steering/mamba-tiny/optimism/sweep.parquet",
        "data/lens/rwkv-tiny/evaluation.csv",
        "data/quirky/addition/table.parquet",
    ]
    result = snakemake(run_copy, *tables, "--forceall", "--configfile", "configs/test.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    for table in tables:
        read = pd.read_parquet if table.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(run_copy / table), read(finished_run / table), check_exact=True)
        assert (run_copy / table).stat().st_mtime > (finished_run / table).stat().st_mtime  # really recomputed


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    """mkstemp and mkdtemp make owner-only temporaries (and safetensors writes 0600 files); a shared
    data folder on a cluster needs the outputs readable like any file the user writes."""
    import os

    import torch
    from safetensors.torch import save_file

    from workflow_scripts.atomic import atomic_dir, atomic_path

    mask = os.umask(0)
    os.umask(mask)
    with atomic_path(tmp_path / "vectors.safetensors") as tmp:
        save_file({"v": torch.zeros(2)}, tmp)
    with atomic_path(tmp_path / "table.csv") as tmp:
        tmp.write_text("a\n")
    with atomic_dir(tmp_path / "weights") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "vectors.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "weights").stat().st_mode & 0o777 == 0o777 & ~mask

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

"""What the workflow adds to Snakemake's own start-up, for a no-op rerun and for dry runs.

Runs, interleaved so that machine noise hits every command alike, N rounds of:
  version   `snakemake --version`                       (the issue's baseline: imports and argument parsing)
  empty     `snakemake -n -q` on a one-rule Snakefile     (Snakemake's whole machinery, no workflow code)
  <config>  `snakemake -n -q --configfile <config>`       (this workflow: config check, rules, DAG)
and prints the median wall time of each and each config's excess over `version` and over `empty`.
A config whose outputs all exist (after `make demo` for config.yaml) measures a true no-op rerun;
others measure planning every job (configs/paper.yaml: 240 jobs).

Run: .venv/bin/python bench/bench_startup.py [--rounds 7] [--configs config.yaml configs/paper.yaml]
Needs no running Snakemake in this directory (a dry run waits for the lock otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--configs", nargs="+", default=["config.yaml", "configs/test.yaml", "configs/paper.yaml"])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as empty_dir:
        Path(empty_dir, "Snakefile").write_text('rule all:\n    output: "done"\n    shell: "touch {output}"\n')
        commands = {
            "version": ([*SNAKEMAKE, "--version"], ROOT),
            "empty": ([*SNAKEMAKE, "-n", "-q", "--cores", "1"], Path(empty_dir)),
            **{config: ([*SNAKEMAKE, "-n", "-q", "--configfile", config], ROOT) for config in args.configs},
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, (command, cwd) in commands.items():
                times[name].append(timed(command, cwd))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(json.dumps({"benchmark": "startup", "command": name, "median_s": round(median, 3), "rounds": rounds}))
    summary = {"benchmark": "startup", "snakemake_version_s": round(medians["version"], 3),
               "snakemake_empty_workflow_s": round(medians["empty"], 3)}  # fmt: skip
    for config in args.configs:
        key = Path(config).stem
        summary[f"workflow_over_version_s_{key}"] = round(medians[config] - medians["version"], 3)
        summary[f"workflow_over_empty_s_{key}"] = round(medians[config] - medians["empty"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

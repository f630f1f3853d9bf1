"""What the workflow adds to Snakemake's own start-up on a no-op rerun, against Snakemake's floor.

For each config, a scratch copy of the repository is made in which every output of the config exists and
carries Snakemake's metadata, as after a complete run: the outputs are written as placeholders (empty
folders for `directory()` outputs) and recorded with `snakemake --touch --forceall`, which writes the
metadata that the rerun triggers (params, input, code, software environment) read. Then, interleaved so
that machine noise hits every command alike, N rounds of:
  version     `snakemake --version`                      (the issue's baseline: imports, argument parsing)
  <config>    `snakemake -n -q --configfile <config>`    (a true no-op rerun of this workflow)
  bare-<n>    `snakemake -n -q` on a generated workflow of the same number of jobs, each one input and
              one output, no params, logs or workflow code, every output present with its metadata:
              Snakemake's own per-job floor for a DAG of that size
Prints each command's median wall and CPU time and each config's excess over `version` and over its
bare floor. CPU time (user + system of the child) is printed because wall time on a shared machine
swings by tenths of a second between rounds.

Run: .venv/bin/python bench/bench_startup.py [--rounds 9] [--configs configs/test.yaml configs/paper.yaml]
Making the copies takes ~10 s per 100 jobs (the touch run); nothing in the repository is changed.

`--plugin-cost` measures instead what the SLURM executor plugin (the `slurm` extra, `make slurm-setup`)
adds to every snakemake command: `snakemake --version` through one launcher, interleaved, with the
plugin visible and with it hidden from Snakemake's plugin discovery (pkgutil.iter_modules), so one
environment serves both arms. It needs the plugin installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run(command: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout); exits with the command's error if it fails."""
    env = {**os.environ, "PYTHONPATH": str(cwd / "workflow_scripts"), **(extra_env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def directory_patterns(repo: Path) -> list[re.Pattern]:
    """The workflow's directory() outputs as regexes (a wildcard matches one path component)."""
    patterns = []
    for rule_file in [repo / "Snakefile", *sorted((repo / "rules").glob("*.smk"))]:
        for pattern in re.findall(r'directory\(\s*"([^"]+)"', rule_file.read_text()):
            parts = re.split(r"(\{[^}]+\})", pattern)
            regex = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
            patterns.append(re.compile(regex + "$"))
    return patterns


def assert_noop(directory: Path, options: list[str]) -> None:
    _, _, out = run([*SNAKEMAKE, "-n", *options], directory)
    if "Nothing to be done" not in out:
        sys.exit(f"the scratch copy in {directory} is not a no-op:\n{out[-2000:]}")


def make_noop_copy(config: str, destination: Path) -> int:
    """A copy of the tracked files in which every output of `config` exists with its metadata; returns
    the number of jobs of a full run."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source, target = ROOT / name, destination / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    options = ["--configfile", config]
    _, _, summary = run([*SNAKEMAKE, "--summary", *options], destination)
    outputs = [line.split("\t")[0] for line in summary.splitlines()[1:] if line.strip()]
    directories = directory_patterns(destination)
    for output in outputs:
        path = destination / output
        if any(pattern.match(output) for pattern in directories):
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
    run([*SNAKEMAKE, "--touch", "--forceall", "--cores", "1", *options], destination)
    _, _, plan = run([*SNAKEMAKE, "-n", "--forceall", *options], destination)
    jobs = re.search(r"^total\s+(\d+)", plan, flags=re.MULTILINE)
    assert_noop(destination, options)
    return int(jobs.group(1))


def make_bare_workflow(jobs: int, destination: Path) -> None:
    """`jobs` jobs (a target rule, one shared input, jobs - 2 one-in-one-out jobs), all done."""
    n = jobs - 2
    destination.mkdir(parents=True)
    (destination / "Snakefile").write_text(
        f'rule all:\n    input: expand("out/{{i}}.txt", i=range({n}))\n\n'
        'rule step:\n    input: "shared.txt"\n    output: "out/{i}.txt"\n    shell: "touch {output}"\n\n'
        'rule shared:\n    output: "shared.txt"\n    shell: "touch {output}"\n'
    )
    (destination / "out").mkdir()
    (destination / "shared.txt").write_text("")
    for i in range(n):
        (destination / "out" / f"{i}.txt").write_text("")
    run([*SNAKEMAKE, "--touch", "--forceall", "--cores", "1", "-q"], destination)
    assert_noop(destination, [])


# Runs snakemake's command line; with HIDE_PLUGINS set, Snakemake's plugin discovery does not see the
# named packages (as if they were not installed).
LAUNCHER = """
import os, pkgutil, sys
hidden = tuple(filter(None, os.environ.get("HIDE_PLUGINS", "").split(",")))
if hidden:
    listed = pkgutil.iter_modules
    pkgutil.iter_modules = lambda *a, **k: (m for m in listed(*a, **k) if not m.name.startswith(hidden))
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def plugin_cost(rounds: int) -> None:
    """`snakemake --version` with the SLURM executor plugin visible and hidden, interleaved."""
    import importlib.util

    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        sys.exit("the SLURM executor plugin is not installed here (make slurm-setup): nothing to compare")
    arms = {"with_slurm_plugin": "", "without_slurm_plugin": "snakemake_executor_plugin_slurm"}
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            for arm, hidden in arms.items():
                command = [sys.executable, "-c", LAUNCHER, "--version"]
                seconds, cpu_seconds, out = run(command, Path(scratch), {"HIDE_PLUGINS": hidden})
                assert out.strip(), "snakemake --version printed nothing"
                wall[arm].append(seconds)
                cpu[arm].append(cpu_seconds)
    summary = {"benchmark": "startup_plugin_cost", "rounds": rounds}
    for arm in arms:
        summary[f"version_wall_s_{arm}"] = round(statistics.median(wall[arm]), 3)
        summary[f"version_cpu_s_{arm}"] = round(statistics.median(cpu[arm]), 3)
    summary["plugin_cost_wall_s"] = round(
        summary["version_wall_s_with_slurm_plugin"] - summary["version_wall_s_without_slurm_plugin"], 3
    )
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--configs", nargs="+", default=["config.yaml", "configs/test.yaml", "configs/paper.yaml"])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--plugin-cost", action="store_true", help="what the SLURM plugin adds to start-up")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    if args.plugin_cost:
        plugin_cost(rounds)
        return
    with tempfile.TemporaryDirectory() as scratch:
        commands: dict[str, tuple[list[str], Path]] = {"version": ([*SNAKEMAKE, "--version"], Path(scratch))}
        floors: dict[str, str] = {}
        for config in args.configs:
            copy = Path(scratch, Path(config).stem)
            jobs = make_noop_copy(config, copy)
            bare = f"bare-{jobs}"
            if bare not in commands:
                make_bare_workflow(jobs, Path(scratch, bare))
                commands[bare] = ([*SNAKEMAKE, "-n", "-q", "--cores", "1"], Path(scratch, bare))
            commands[config] = ([*SNAKEMAKE, "-n", "-q", "--configfile", config], copy)
            floors[config] = bare
            print(json.dumps({"benchmark": "startup", "config": config, "jobs": jobs}), flush=True)
        wall: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, (command, cwd) in commands.items():
                seconds, cpu_seconds, _ = run(command, cwd)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    for name in commands:
        print(json.dumps({"benchmark": "startup", "command": name, "rounds": rounds,
                          "wall_s": round(median_wall[name], 3), "cpu_s": round(median_cpu[name], 3)}))  # fmt: skip
    summary = {"benchmark": "startup", "snakemake_version_s": round(median_wall["version"], 3)}
    for config in args.configs:
        key, floor = Path(config).stem, floors[config]
        summary[f"noop_over_version_s_{key}"] = round(median_wall[config] - median_wall["version"], 3)
        summary[f"noop_over_version_cpu_s_{key}"] = round(median_cpu[config] - median_cpu["version"], 3)
        summary[f"floor_over_version_s_{key}"] = round(median_wall[floor] - median_wall["version"], 3)
        summary[f"noop_over_floor_cpu_s_{key}"] = round(median_cpu[config] - median_cpu[floor], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

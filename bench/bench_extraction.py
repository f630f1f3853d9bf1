"""Benchmark of activation extraction (prints JSON; not a test).

For each model: tokens per second of extraction (forward + hooks + Parquet write) against a bare
forward pass of the same batches in the same process, and peak RSS of an extraction of N and of 4N
prompts (each in a fresh process, so the peaks are comparable). The last line is one JSON object
with `extraction_overhead` (extraction time / bare forward time, worst model) and `rss_growth`
(peak RSS at 4N / at N, worst model).

Run: make bench   (or: .venv/bin/python bench/bench_extraction.py [--quick])
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.activations import extract_activations  # noqa: E402
from workflow_scripts.adapters import load_adapter  # noqa: E402
from workflow_scripts.model_sources import materialize  # noqa: E402
from workflow_scripts.prompts import PromptItem, load_prompt_set, tokenize_prompts  # noqa: E402

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
MODELS = {"mamba-tiny": DEFAULT["mamba-tiny"], "smollm2-135m-instruct": DEFAULT["smollm2-135m-instruct"]}
SETTINGS = {"positions": "last", "layers": "all", "storage_dtype": "float32", "rows_per_row_group": 512}


def prompts(count: int) -> list[PromptItem]:
    """`count` distinct prompts made from the committed demo set (cycled, numbered)."""
    base = load_prompt_set(REPO / "data/inputs/prompts/demo.jsonl")
    return [
        PromptItem(index=i, id=f"p{i}", prompt=f"({i}) {base[i % len(base)].prompt}", label=base[i % len(base)].label)
        for i in range(count)
    ]


def adapter_for(name: str, workdir: Path):
    spec = MODELS[name]
    materialize(spec, name, workdir / name)
    return load_adapter(spec, name, workdir / name / "weights")


def timed_pair(adapter, items, batch_size, out: Path, repeats: int) -> dict:
    tokens = tokenize_prompts(adapter, items, "chat")
    order = sorted(range(len(items)), key=lambda i: len(tokens[i]))
    batches = [adapter.batch([tokens[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]

    def bare():
        with torch.no_grad():
            for batch in batches:
                adapter.forward(batch.input_ids, batch.attention_mask)

    def extraction():
        extract_activations(adapter, items, tokens, out, batch_size=batch_size, metadata={}, progress=False, **SETTINGS)

    bare()  # warm-up
    times = {"bare": [], "extraction": []}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        for label, run in (("bare", bare), ("extraction", extraction)):
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    n_tokens = sum(map(len, tokens))
    bare_s, extract_s = min(times["bare"]), min(times["extraction"])
    return {
        "prompts": len(items),
        "tokens": n_tokens,
        "bare_tokens_per_s": round(n_tokens / bare_s, 1),
        "extraction_tokens_per_s": round(n_tokens / extract_s, 1),
        "extraction_overhead": round(extract_s / bare_s, 3),
        "parquet_mb": round(out.stat().st_size / 2**20, 2),
    }


def peak_rss_child(name: str, count: int, batch_size: int, workdir: str) -> None:
    adapter = adapter_for(name, Path(workdir))
    items = prompts(count)
    tokens = tokenize_prompts(adapter, items, "chat")
    out = Path(workdir) / f"rss-{count}.parquet"
    extract_activations(adapter, items, tokens, out, batch_size=batch_size, metadata={}, progress=False, **SETTINGS)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(name: str, count: int, batch_size: int, workdir: Path) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--rss-child", name, str(count), str(batch_size), str(workdir)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.rss_child:
        name, count, batch_size, workdir = args.rss_child
        return peak_rss_child(name, int(count), int(batch_size), workdir)
    n_prompts, repeats, batch_size = (32, 2, 8) if args.quick else (128, 3, 16)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in MODELS:
            adapter = adapter_for(name, workdir)
            figures = timed_pair(adapter, prompts(n_prompts), batch_size, workdir / f"{name}.parquet", repeats)
            del adapter
            rss_n = peak_rss(name, n_prompts, batch_size, workdir)
            rss_4n = peak_rss(name, 4 * n_prompts, batch_size, workdir)
            figures.update(
                peak_rss_mb_n=round(rss_n, 1), peak_rss_mb_4n=round(rss_4n, 1), rss_growth=round(rss_4n / rss_n, 3)
            )
            results[name] = figures
            print(json.dumps({"model": name, **figures}), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "extraction",
                "extraction_overhead": max(r["extraction_overhead"] for r in results.values()),
                "rss_growth": max(r["rss_growth"] for r in results.values()),
                "models": sorted(results),
            }
        )
    )


if __name__ == "__main__":
    main()

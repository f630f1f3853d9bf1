"""Benchmark of tuned-lens training (prints JSON; not a test).

On SmolLM2-135M-Instruct and the default config's tiny Mamba: training tokens per second, and the
time of one lens training step relative to one forward pass of the model on the same tokens, same
process (the step includes that forward, so the ratio is at least 1). Last line:
{"lens_step_over_forward": larger ratio, ...}.

Run: .venv/bin/python bench/bench_lens.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.adapters import load_adapter  # noqa: E402
from workflow_scripts.corpus import python_reference_texts  # noqa: E402
from workflow_scripts.lens import TunedLens, build_corpus, train_lens  # noqa: E402
from workflow_scripts.model_sources import materialize  # noqa: E402

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
MODELS = ("mamba-tiny", "smollm2-135m-instruct")


def measure(name: str, workdir: Path, seq_len: int, tokens_per_step: int, steps: int) -> dict:
    spec = DEFAULT[name]
    materialize(spec, name, workdir / name)
    adapter = load_adapter(spec, name, workdir / name / "weights")
    encode = lambda text: adapter.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    train, _ = build_corpus(python_reference_texts(), encode, seq_len, tokens_per_step * steps, seq_len, 0,
                            eos_token_id=adapter.tokenizer.eos_token_id)
    batch = torch.as_tensor(train[: tokens_per_step // seq_len], dtype=torch.long)
    with torch.no_grad():
        adapter.forward(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            adapter.forward(batch)
        forward_s = (time.perf_counter() - start) / steps
    lens = TunedLens(adapter)
    train_lens(adapter, lens, train[: batch.shape[0]], steps=1, tokens_per_step=tokens_per_step,
               batch_size=batch.shape[0], progress=False)  # warm-up
    start = time.perf_counter()
    train_lens(adapter, TunedLens(adapter), train, steps=steps, tokens_per_step=tokens_per_step,
               batch_size=batch.shape[0], progress=False)
    step_s = (time.perf_counter() - start) / steps
    return {"model": name, "n_layers": adapter.n_layers, "tokens_per_step": tokens_per_step,
            "forward_s": round(forward_s, 3), "lens_step_s": round(step_s, 3),
            "train_tokens_per_s": round(tokens_per_step / step_s, 1),
            "lens_step_over_forward": round(step_s / forward_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seq_len, tokens_per_step, steps = (64, 256, 2) if args.quick else (128, 1024, 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            results.append(measure(name, Path(tmp), seq_len, tokens_per_step, steps))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "lens", "lens_step_over_forward": max(r["lens_step_over_forward"] for r in results),
                      "train_tokens_per_s": {r["model"]: r["train_tokens_per_s"] for r in results}}))


if __name__ == "__main__":
    main()

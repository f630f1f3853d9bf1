"""Training speed of the models the pipeline trains, per family, on the CPU: tokens per second of one
optimizer step (forward, backward, AdamW) with the exact fast scans (`fast_scans.fast_training`)
and, for the recurrent families, with transformers' reference path (autograd through a loop over time).

Prints one JSON line per (family, path) and a summary with `rnn_train_speed_vs_transformer`: the
slowest recurrent family's tokens/s over the same-size transformer's (target >= 0.5).

Run: .venv/bin/python bench/bench_training.py [--quick] [--hidden 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.fast_scans import fast_training  # noqa: E402
from workflow_scripts.pretraining import build_model  # noqa: E402

VOCAB = 4096


def configs(hidden: int, layers: int) -> dict[str, tuple[str, dict]]:
    return {
        "transformer": ("llama", {"hidden_size": hidden, "num_hidden_layers": layers,
                                  "num_attention_heads": max(1, hidden // 64),
                                  "intermediate_size": 4 * hidden, "max_position_embeddings": 1024}),
        "mamba": ("mamba", {"hidden_size": hidden, "num_hidden_layers": layers, "state_size": 16, "expand": 2}),
        "rwkv": ("rwkv", {"hidden_size": hidden, "num_hidden_layers": layers, "attention_hidden_size": hidden,
                          "intermediate_size": 4 * hidden, "context_length": 1024, "rescale_every": 0}),
    }  # fmt: skip


def seconds_per_step(model, ids, steps: int, fast: bool) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    context = fast_training(model) if fast else torch.enable_grad()
    with context:
        times = []
        for _ in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    steps = 2 if args.quick else 5
    ids = torch.randint(0, VOCAB, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    speeds = {}
    for family, (model_type, config) in configs(args.hidden, args.layers).items():
        model = build_model(model_type, config, VOCAB, seed=0)
        model.train()
        parameters = sum(p.numel() for p in model.parameters())
        paths = ["fast"] if family == "transformer" else ["fast", "reference"]
        for path in paths:
            if path == "reference" and family == "mamba" and args.quick:
                continue  # the reference Mamba loop is the slow one: skipped in --quick
            step = seconds_per_step(model, ids, 1 if path == "reference" else steps, fast=path == "fast")
            speeds[family, path] = tokens / step
            print(
                json.dumps(
                    {
                        "benchmark": "training",
                        "family": family,
                        "path": path,
                        "parameters": parameters,
                        "seconds_per_step": round(step, 3),
                        "tokens_per_second": round(tokens / step),
                    }
                )
            )
    slowest_rnn = min(speeds["mamba", "fast"], speeds["rwkv", "fast"])
    summary = {
        "benchmark": "training", "hidden": args.hidden, "layers": args.layers, "tokens_per_step": tokens,
        **{f"train_tokens_per_s_{name}": round(speeds[name, "fast"]) for name in ("transformer", "mamba", "rwkv")},
        "rnn_train_speed_vs_transformer": round(slowest_rnn / speeds["transformer", "fast"], 3),
    }  # fmt: skip
    for family in ("mamba", "rwkv"):
        if (family, "reference") in speeds:
            summary[f"{family}_fast_over_reference"] = round(speeds[family, "fast"] / speeds[family, "reference"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

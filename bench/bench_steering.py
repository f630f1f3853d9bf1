"""Benchmark of the steering sweep (prints JSON; not a test).

On the default config's tiny Mamba and on SmolLM2-135M-Instruct, with prompts as long as the paper's
(the CAA test items beside the checkout when present, else this project's items lengthened to the
same size), time the cached-prefix sweep (`steering_sweep`: each prefix once, all multipliers of a
layer in one batched pass) against the naive per-(layer, multiplier) full recomputation
(`naive_sweep`), same process, same inputs, and check they agree. The naive sweep is slow, so both
run on a few evenly spaced layers; the sweep's prefix cost is shared by all layers, so the speedup
over every layer is larger than the one printed. Last line: {"steering_speedup": smaller ratio}.

Run: .venv/bin/python bench/bench_steering.py [--quick]
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
from workflow_scripts.model_sources import materialize  # noqa: E402
from bench.reference import load_behavior, naive_sweep  # noqa: E402
from workflow_scripts.steering import MULTIPLIERS, steering_sweep  # noqa: E402

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
MODELS = ("mamba-tiny", "smollm2-135m-instruct")
CAA = REPO.parent / "shared" / "datasets" / "caa" / "survival-instinct"


def test_items(count: int) -> tuple[list[dict], str]:
    if CAA.is_dir():
        items = [i for i in load_behavior(CAA)[1] if i["answer_matching_behavior"] in ("(A)", "(B)")]
        return items[:count], str(CAA)
    # Fresh clone: the project's items, the question repeated to the CAA items' typical length.
    _, items = load_behavior(REPO / "data/inputs/behaviors/optimism")
    lengthened = []
    for item in items[:count]:
        question, choices = item["question"].split("\n\nChoices:")
        lengthened.append({**item, "question": (question + " ") * 6 + "\n\nChoices:" + choices})
    return lengthened, "data/inputs/behaviors/optimism (lengthened)"


def measure(name: str, workdir: Path, n_items: int, n_layers: int) -> dict:
    spec = DEFAULT[name]
    materialize(spec, name, workdir / name)
    adapter = load_adapter(spec, name, workdir / name / "weights")
    items, source = test_items(n_items)
    generator = torch.Generator().manual_seed(0)
    # A vector the size of typical CAA vectors: a tenth of the stream's norm per layer, random direction.
    vectors = torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator)
    vectors *= 0.1 * adapter.hidden_size**0.5 / vectors.norm(dim=1, keepdim=True)
    layers = sorted({round(i * (adapter.n_layers - 1) / max(n_layers - 1, 1)) for i in range(n_layers)})
    arguments = {"mode": "residual", "residual_vectors": vectors, "layers": layers, "multipliers": MULTIPLIERS}
    steering_sweep(adapter, items[:1], **{**arguments, "layers": layers[:1]})  # warm-up
    start = time.perf_counter()
    fast = steering_sweep(adapter, items, **arguments)
    sweep_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = naive_sweep(adapter, items, **arguments)
    naive_s = time.perf_counter() - start
    keys = ["item", "layer", "multiplier"]
    difference = (fast.sort_values(keys).p_matching.to_numpy() - slow.sort_values(keys).p_matching.to_numpy())
    tokens = [len(adapter.encode(adapter.build_prompt(i["question"], "("))) for i in items]
    return {
        "model": name, "items": len(items), "items_from": source, "mean_prompt_tokens": sum(tokens) / len(tokens),
        "layers": layers, "multipliers": len(MULTIPLIERS), "sweep_s": round(sweep_s, 2), "naive_s": round(naive_s, 2),
        "steering_speedup": round(naive_s / sweep_s, 2), "max_abs_difference": float(abs(difference).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and layers")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_items, n_layers = (2, 2) if args.quick else (3, 4)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            results.append(measure(name, Path(tmp), n_items, n_layers))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "steering", "steering_speedup": min(r["steering_speedup"] for r in results)}))


if __name__ == "__main__":
    main()

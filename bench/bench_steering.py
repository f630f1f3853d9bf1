"""Benchmark of the steering sweep (prints JSON; not a test).

Every layer x the paper's 9 multipliers, timed two ways in the same process on the same inputs: the
cached-prefix sweep (`steering_sweep`: each prompt's prefix once, then all (layer, multiplier) rows
in one batched pass over the last token) and the naive recomputation (`bench.reference.naive_sweep`:
per (layer, multiplier) the whole prompt again, batch size 1, last-position logits only), and the
largest difference between their p_matching. Models: SmolLM2-135M-Instruct (residual mode, 30
layers) and the default config's tiny Mamba and RWKV (residual, state and both modes). Prompts are
as long as the paper's (the CAA test items beside the checkout when present, else this project's
items lengthened to the same size).

Each line also splits the sweep's time (`fast_split_s`): the prefix passes, the batched passes over
the last tokens, the copies of the state for them, the state additions, and the rest (Python).

Last line: {"steering_speedup": the smallest ratio, "steering_speedup_<model>_<mode>": each ratio,
"steering_max_abs_difference": the largest difference}.

Run: .venv/bin/python bench/bench_steering.py [--quick] [--items N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.adapters import load_adapter  # noqa: E402
from workflow_scripts.model_sources import materialize  # noqa: E402
from bench.reference import load_behavior, naive_sweep  # noqa: E402
from workflow_scripts.steering import MULTIPLIERS, contrast_prompts, state_vectors, steering_sweep  # noqa: E402

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
# (config entry, modes); the recurrent ones also in the state modes.
CASES = [
    ("smollm2-135m-instruct", ("residual",)),
    ("mamba-tiny", ("residual", "state", "both")),
    ("rwkv-tiny", ("residual", "state", "both")),
]
SHORT = {"smollm2-135m-instruct": "smollm2", "mamba-tiny": "mamba", "rwkv-tiny": "rwkv"}
CAA = REPO.parent / "shared" / "datasets" / "caa" / "survival-instinct"
# What the split of the sweep's time counts: adapter method -> part (only the outermost call counts).
PARTS = {"forward": "passes", "continue_rows": "passes", "repeat_state": "state_copies", "add_to_state": "state_adds"}


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


@contextlib.contextmanager
def split_timer(adapter, totals: dict):
    """Adds to `totals` the time spent in the adapter's model passes, state copies and state additions
    (an outermost call only: a pass inside a timed call is not counted twice). A prefix pass is the
    one forward that keeps a single row's logits."""
    depth = [0]

    def timed(name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if depth[0]:
                return method(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                part = "prefix" if name == "forward" and kwargs.get("logits_to_keep") == 1 else PARTS[name]
                totals[part] += time.perf_counter() - start

        return wrapper

    for name in PARTS:
        setattr(adapter, name, timed(name, getattr(adapter, name)))
    try:
        yield
    finally:
        for name in PARTS:
            delattr(adapter, name)  # the class's methods again


def random_vectors(adapter) -> torch.Tensor:
    """A vector the size of typical CAA vectors: a tenth of the stream's norm per layer, random direction."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator)
    return vectors * 0.1 * adapter.hidden_size**0.5 / vectors.norm(dim=1, keepdim=True)


def measure(adapter, name: str, mode: str, items: list[dict], source: str, residual, deltas) -> dict:
    layers = list(range(adapter.n_layers))
    arguments = {"mode": mode, "residual_vectors": residual, "state_deltas": deltas, "multipliers": MULTIPLIERS}
    steering_sweep(adapter, items[:1], layers=layers[:1], **arguments)  # warm-up
    split = defaultdict(float)
    start = time.perf_counter()
    with split_timer(adapter, split):
        fast = steering_sweep(adapter, items, layers=layers, layers_per_pass=len(layers), **arguments)
    sweep_s = time.perf_counter() - start
    split["python_and_other"] = sweep_s - sum(split.values())
    start = time.perf_counter()
    slow = naive_sweep(adapter, items, layers=layers, **arguments)
    naive_s = time.perf_counter() - start
    keys = ["item", "layer", "multiplier"]
    difference = fast.sort_values(keys).p_matching.to_numpy() - slow.sort_values(keys).p_matching.to_numpy()
    tokens = [len(adapter.encode_prompt(adapter.build_prompt(i["question"], "("))) for i in items]
    return {
        "model": name, "mode": mode, "items": len(items), "items_from": source, "prompt_tokens": tokens,
        "layers": len(layers), "multipliers": len(MULTIPLIERS), "rows_per_pass": len(layers) * len(MULTIPLIERS),
        "sweep_s": round(sweep_s, 3), "naive_s": round(naive_s, 2), "steering_speedup": round(naive_s / sweep_s, 1),
        "max_abs_difference": float(abs(difference).max()),
        "fast_split_s": {part: round(seconds, 3) for part, seconds in sorted(split.items())},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one prompt instead of two")
    parser.add_argument("--items", type=int, default=None, help="test prompts per model (default 2, quick 1)")
    parser.add_argument("--models", nargs="*", default=[name for name, _ in CASES], help="config entries to run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one core, for figures that compare
    n_items = args.items or (1 if args.quick else 2)
    items, source = test_items(n_items)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, modes in CASES:
            if name not in args.models:
                continue
            spec = DEFAULT[name]
            materialize(spec, name, Path(tmp) / name)
            adapter = load_adapter(spec, name, Path(tmp) / name / "weights")
            residual, deltas = random_vectors(adapter), None
            if adapter.has_recurrent_state:
                deltas = state_vectors(adapter, *contrast_prompts(adapter, items))
            for mode in modes:
                results.append(measure(adapter, name, mode, items, source, residual, deltas))
                print(json.dumps(results[-1]), flush=True)
    summary = {"benchmark": "steering", "steering_speedup": min(r["steering_speedup"] for r in results)}
    summary.update({f"steering_speedup_{SHORT.get(r['model'], r['model'])}_{r['mode']}": r["steering_speedup"]
                    for r in results})  # fmt: skip
    summary["steering_max_abs_difference"] = max(r["max_abs_difference"] for r in results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

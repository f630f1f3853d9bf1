"""GPU readiness check: the figures of one short run on a GPU machine, as one JSON file.

Run by bench/gpu_check.sh (which first installs what the machine lacks from the carried wheels); it
also runs on a CPU, where the GPU parts are skipped with their reason and the code paths still run
on the tiny test models. Parts, each recorded even when another fails:

- environment: torch, CUDA, the GPU, transformers, and whether the Mamba kernels (mamba-ssm,
  causal-conv1d) import and are the path transformers' Mamba takes;
- tests/test_gpu.py: the kernels against the reference path (pytest's outcome and skip reasons);
- bf16 extraction: tokens/s of the extraction in bfloat16 and in float32 on the same prompts, and
  how far the bf16 residual stream is from the float32 one (relative norm of the difference);
- the steering sweep benchmark (bench/bench_steering.measure): every layer x 9 multipliers, the
  cached-prefix sweep against the naive per-setting recomputation, on a random-init model shaped
  like SmolLM2-135M (residual) and one shaped like Mamba-130m (residual, state, both). Random
  weights: the GGUF file of SmolLM2 is too large to carry, and speed does not depend on the weights.

Run: python bench/gpu_check.py --out $OUT/gpu_check.json [--kernels-json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.atomic import atomic_path  # noqa: E402

ON_GPU = torch.cuda.is_available()
NO_GPU = "no CUDA GPU on this machine"
# Random-init stand-ins on a GPU (shaped like the real models), the test config's tiny ones on a CPU.
GPU_MODELS = {
    "llama-smollm2-shape": {"family": "transformer", "source": {"tiny": {"model_type": "llama", "seed": 0, "config": {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "max_position_embeddings": 8192}}}},
    "mamba-130m-shape": {"family": "mamba", "source": {"tiny": {"model_type": "mamba", "seed": 0, "config": {
        "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "expand": 2}}}},
}  # fmt: skip


def cpu_models() -> dict:
    import yaml

    tiny = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())["models"]
    return {name: tiny[name] for name in ("llama-tiny", "mamba-tiny")}


def environment() -> dict:
    import transformers

    found = {}
    for module in ("mamba_ssm", "causal_conv1d"):
        try:
            imported = importlib.import_module(module) if importlib.util.find_spec(module) else None
            found[module] = getattr(imported, "__version__", "present") if imported else None
        except Exception as error:  # an extension built for another torch fails here
            found[module] = f"import failed: {type(error).__name__}: {str(error)[:300]}"
    from transformers.models.mamba import modeling_mamba

    return {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": ON_GPU, "gpu": torch.cuda.get_device_name(0) if ON_GPU else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "transformers": transformers.__version__,
        "kernels": found,
        "mamba_kernel_path": bool(getattr(modeling_mamba, "is_fast_path_available", False)) and ON_GPU,
    }  # fmt: skip


def gpu_tests(workdir: Path) -> dict:
    report = workdir / "test_gpu.xml"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    outcome = {"returncode": result.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if report.is_file():
        suite = ElementTree.parse(report).getroot().find("testsuite")
        outcome.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
        outcome["skip_reasons"] = sorted({skip.get("message", "") for skip in suite.iter("skipped")})
    outcome["output_tail"] = (result.stdout + result.stderr)[-1500:]
    return outcome


def load(spec: dict, name: str, workdir: Path, dtype: str | None = None):
    from workflow_scripts.adapters import load_adapter
    from workflow_scripts.model_sources import materialize

    if not (workdir / name / "weights").is_dir():
        materialize(spec, name, workdir / name)
    return load_adapter({**spec, **({"dtype": dtype} if dtype else {})}, name, workdir / name / "weights")


def bf16_extraction(models: dict, workdir: Path, n_prompts: int) -> dict:
    from bench.bench_extraction import prompts
    from workflow_scripts.activations import extract_activations, read_layer
    from workflow_scripts.prompts import tokenize_prompts

    items = prompts(n_prompts)
    figures = {}
    for name, spec in models.items():
        runs = {}
        for dtype in ("float32", "bfloat16"):
            adapter = load(spec, name, workdir, dtype)
            tokens = tokenize_prompts(adapter, items, "chat")
            out = workdir / f"{name}-{dtype}.parquet"
            settings = dict(batch_size=16, positions="last", layers="all", storage_dtype="float32",
                            rows_per_row_group=512, metadata={}, progress=False)  # fmt: skip
            extract_activations(adapter, items[:16], tokens[:16], workdir / "warm-up.parquet", **settings)
            start = time.perf_counter()
            extract_activations(adapter, items, tokens, out, **settings)
            if ON_GPU:
                torch.cuda.synchronize()
            runs[dtype] = (time.perf_counter() - start, out, adapter.n_layers, sum(map(len, tokens)))
            del adapter
        errors = []
        for layer in range(runs["float32"][2]):
            exact, rough = read_layer(runs["float32"][1], layer)[1], read_layer(runs["bfloat16"][1], layer)[1]
            errors.append(float(((rough - exact) ** 2).sum() ** 0.5 / ((exact**2).sum() ** 0.5)))
        n_tokens = runs["float32"][3]
        figures[name] = {
            "prompts": n_prompts, "tokens": n_tokens,
            "float32_tokens_per_s": round(n_tokens / runs["float32"][0], 1),
            "bfloat16_tokens_per_s": round(n_tokens / runs["bfloat16"][0], 1),
            "bf16_speedup": round(runs["float32"][0] / runs["bfloat16"][0], 2),
            "bf16_relative_error_max_over_layers": round(max(errors), 5),
        }  # fmt: skip
    return figures


def sweep(models: dict, workdir: Path, n_items: int) -> dict:
    from bench.bench_steering import measure, random_vectors, test_items
    from workflow_scripts.steering import contrast_prompts, state_vectors

    items, source = test_items(n_items)
    results = []
    for name, spec in models.items():
        adapter = load(spec, name, workdir)
        residual, deltas = random_vectors(adapter), None
        modes = ["residual"]
        if adapter.has_recurrent_state:
            deltas = state_vectors(adapter, *contrast_prompts(adapter, items))
            modes += ["state", "both"]
        results += [measure(adapter, name, mode, items, source, residual, deltas) for mode in modes]
    return {
        "runs": results, "steering_speedup": min(r["steering_speedup"] for r in results),
        "max_abs_difference": max(r["max_abs_difference"] for r in results),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--kernels-json", type=Path, help="what gpu_check.sh found and installed")
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not ON_GPU:
        torch.set_num_threads(1)
    record: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": {}, "failed": {}}
    if args.kernels_json and args.kernels_json.is_file():
        record["kernel_install"] = json.loads(args.kernels_json.read_text())
    models = GPU_MODELS if ON_GPU else cpu_models()
    record["models"] = {name: "random-init" + (", shaped like the real model" if ON_GPU else " tiny (CPU smoke run)")
                        for name in models}  # fmt: skip
    parts = {
        "environment": environment,
        "test_gpu": lambda: gpu_tests(workdir),
        "bf16_extraction": lambda: bf16_extraction(models, workdir, 32 if args.quick else 256),
        "steering_sweep": lambda: sweep(models, workdir, 1 if args.quick else 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for part, run in parts.items():
            start = time.perf_counter()
            try:
                record[part] = run()
            except Exception as error:
                record["failed"][part] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"
            record.setdefault("seconds", {})[part] = round(time.perf_counter() - start, 1)
            print(f"gpu_check: {part} done in {record['seconds'][part]} s", flush=True)
    if not ON_GPU:
        record["skipped"]["test_gpu"] = record.get("test_gpu", {}).get("skip_reasons") or NO_GPU
        for part in ("bf16_extraction", "steering_sweep"):
            record["skipped"][part] = f"{NO_GPU}: ran on the CPU with the tiny test models (code path only)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp_path:
        Path(tmp_path).write_text(json.dumps(record, indent=1))
    print(json.dumps({key: record[key] for key in ("skipped", "failed")}, indent=1))
    return 1 if record["failed"] or record.get("test_gpu", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())

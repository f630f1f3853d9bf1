"""Our tuned lens against the public `tuned-lens` package (0.2.0) on the same SmolLM2 tokens (prints JSON).

Both lenses are trained on the same token sequences, in the same order, with the same settings
(steps, tokens per step, micro-batch size, seq_len, SGD Nesterov at lr_scale * (1 - momentum),
weight decay 1e-3, linear decay to 0, grad-norm clip 1.0), then scored on the same held-out
sequences. Ours runs here (workflow_scripts.lens.train_lens / evaluate_lenses); the package runs
in its own virtual environment (default bench/.venv-tuned-lens) through a helper script, fed
through .npy/.json files in a temporary directory:

  * the model: our loader dequantizes the GGUF into a float32 LlamaForCausalLM and saves it with
    save_pretrained; the package side loads that directory with its own `ingredients.Model.load`;
  * training: the package's own `Train.execute` loop (scripts/train_loop.py) with its own
    `TunedLens.from_model`, `Optimizer.create_optim` / `create_scheduler` defaults; only `setup`
    is replaced, so that its data loader yields our sequences in our order (the package's own
    pipeline, chunk_and_tokenize + a shuffling DataLoader2, is not used);
  * evaluation: per-layer KL(final || lens) with the formula of its scripts/eval_loop.py, in
    float32, on the same positions as ours (every position but each sequence's last).

Layers: the package translates the embeddings (its idx 0) and the outputs of blocks 0..n-2 (its
idx 1..n-1); the last block has no translator, its output *is* the model's. Ours has the same
translators (TunedLens with include_input=True) and reads the last block's output with none. Per-layer
lines cover all of them; means are over the translated ones (embeddings + blocks 0..n-2).

Output: one JSON line per layer, one per training step (seconds, loss of each side), and a last
line summarizing mean KL over layers and seconds per step of each side, with their ratios.

Setup of the package's environment (once; tuned-lens 0.2.0 pins nothing above, so the newest
versions come and break it: torchdata >= 0.10 has no dataloader2, transformers 5 rejects the
`load_in_8bit` argument its model loader passes, and datasets 5.2 wants huggingface-hub >= 1):
  python3 -m venv bench/.venv-tuned-lens
  bench/.venv-tuned-lens/bin/pip install torch==2.13.0
  bench/.venv-tuned-lens/bin/pip install tuned-lens==0.2.0
  bench/.venv-tuned-lens/bin/pip install torchdata==0.9.0 transformers==4.57.6 "huggingface-hub<1.0" datasets

Run: .venv/bin/python bench/compare_tuned_lens_package.py
The defaults (8 steps of 128 tokens, 512 eval tokens) take ~9 minutes on 2 busy CPU cores: a step
costs ~20 s per 128 tokens per side there (31 or 30 lens read-outs over a 49152-token vocabulary,
forward and backward). Larger runs: --steps 16 --tokens-per-step 512 --batch-size 8 --eval-tokens 2048.
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

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.adapters import load_adapter  # noqa: E402
from workflow_scripts.corpus import python_reference_texts  # noqa: E402
from workflow_scripts.lens import (  # noqa: E402
    INPUT_LAYER,
    TunedLens,
    build_corpus,
    evaluate_lenses,
    step_sequences,
    train_lens,
)

# ===== the package side: runs in the package's venv ==============================================
PACKAGE_HELPER = r'''
import contextlib, json, sys, time
from pathlib import Path

import numpy as np
import torch as th

job = json.loads(Path(sys.argv[1]).read_text())
work = Path(job["workdir"])
th.set_num_threads(job["threads"])
th.manual_seed(job["seed"])

import transformers
import tuned_lens
import tuned_lens.scripts.ingredients as ing
import tuned_lens.scripts.train_loop as train_loop
from tuned_lens.nn.lenses import LogitLens

if not job["autocast"]:
    # Ablation only: the package's loop always runs the lens under bf16 autocast.
    th.autocast = lambda *args, **kwargs: contextlib.nullcontext()

start = time.perf_counter()
model, _tokenizer = ing.Model(name=job["checkpoint"], precision="float32").load(th.device("cpu"))
load_s = time.perf_counter() - start

train_batches = np.load(work / "train_batches.npy")  # (steps * per_step, seq_len), in step order
eval_tokens = np.load(work / "eval_tokens.npy")
batch_size, seq_len = job["batch_size"], train_batches.shape[1]
batches = [
    {"input_ids": th.as_tensor(train_batches[first : first + batch_size], dtype=th.long)}
    for first in range(0, len(train_batches), batch_size)
]
marks, losses_per_step = [], []


class Train(train_loop.Train):
    """The package's training loop, with our batches in place of its dataset pipeline."""

    def setup(self):
        self.dist.init()
        lens = self.trained_lens = self.get_lens(model)  # TunedLens.from_model(model)
        params = [p for p in lens.parameters() if p.requires_grad]
        opt = self.opt.create_optim(params)
        scheduler = self.opt.create_scheduler(opt, self.num_steps)
        state = train_loop.State(
            dataloader=iter(batches), lens=self.dist.distribute_lens(lens), opt=opt, scheduler=scheduler,
            wandb_id=None, nats_to_bpb=1.0, step=0,
        )
        grad_acc_steps = self.calculate_gradient_accumulation_steps(seq_len)
        marks.append(time.perf_counter())
        return state, model, grad_acc_steps

    def _log(self, opt, step, losses, tuned_lens, nats_to_bpb):
        # Called once per optimizer step, right after it: the step's clock and loss (KL summed
        # over translators, mean over the step's micro-batches), before the loop clears `losses`.
        marks.append(time.perf_counter())
        losses_per_step.append(float(sum(np.mean(v) for v in losses.values())))


trainer = Train(
    model=ing.Model(name=job["checkpoint"], precision="float32"),
    data=ing.Data(name=["unused.jsonl"]),
    opt=ing.Optimizer(),  # SGD, Nesterov, lr_scale 1, momentum 0.9, weight decay 1e-3, no warmup
    dist=ing.Distributed(per_gpu_batch_size=batch_size),
    output=work / "package_lens",
    seed=job["seed"],
    num_steps=job["steps"],
    tokens_per_step=job["tokens_per_step"],
)
with contextlib.redirect_stdout(sys.stderr):
    trainer.execute()
lens = trainer.trained_lens.eval()
step_seconds = np.diff(marks).tolist()

logit_lens = LogitLens.from_model(model).eval()
n_translators = len(lens)
sums = {name: np.zeros(n_translators) for name in ("tuned", "logit", "tuned_all_positions", "logit_all_positions")}
n_tokens = n_tokens_all = 0
with th.no_grad():
    for first in range(0, len(eval_tokens), job["eval_batch_size"]):
        ids = th.as_tensor(eval_tokens[first : first + job["eval_batch_size"]], dtype=th.long)
        output = model(input_ids=ids, output_hidden_states=True)
        hidden_states = output.hidden_states[:-1]
        assert len(hidden_states) == n_translators, (len(hidden_states), n_translators)
        final_lps = output.logits.log_softmax(dim=-1)
        final_probs = final_lps.exp()
        n_tokens += ids[:, :-1].numel()
        n_tokens_all += ids.numel()
        for name, read in (("tuned", lens), ("logit", logit_lens)):
            for j, h in enumerate(hidden_states):
                lens_lps = read(h, idx=j).log_softmax(dim=-1)
                kl = th.sum(final_probs * (final_lps - lens_lps), dim=-1)  # as in scripts/eval_loop.py
                sums[name][j] += float(kl[:, :-1].double().sum())
                sums[name + "_all_positions"][j] += float(kl.double().sum())

result = {
    "versions": {"tuned_lens": tuned_lens.__version__ if hasattr(tuned_lens, "__version__") else None,
                 "torch": th.__version__, "transformers": transformers.__version__},
    "load_s": load_s,
    "grad_acc_steps": len(batches) // job["steps"],
    "step_seconds": step_seconds,
    "losses": losses_per_step,
    "lens_dtype": str(next(lens.parameters()).dtype),
    "kl_tuned": (sums["tuned"] / n_tokens).tolist(),
    "kl_logit": (sums["logit"] / n_tokens).tolist(),
    "kl_tuned_all_positions": (sums["tuned_all_positions"] / n_tokens_all).tolist(),
    "kl_logit_all_positions": (sums["logit_all_positions"] / n_tokens_all).tolist(),
    "n_eval_tokens_scored": n_tokens,
}
(work / "package_result.json").write_text(json.dumps(result))
'''


def make_loadable_by_transformers4(checkpoint: Path) -> None:
    """The package's venv has transformers 4.x (5.x dropped the `load_in_8bit` argument its loader
    passes). A transformers 5 checkpoint keeps rope_theta inside `rope_parameters`, which 4.x does
    not read (it would silently use rope_theta=10000), and names a tokenizer class 4.x lacks. Write
    the 4.x spellings beside them; the package side only needs the tokenizer to load."""
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if rope is not None and "rope_theta" not in config:
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_parameters {rope}: only the default rope is translated for transformers 4")
        config["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2))
    tokenizer_path = checkpoint / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_path.read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2))


def package_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('tuned-lens'))"],
        capture_output=True, text=True,
    )
    return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1:]})"


def layer_name(layer: int) -> str:
    return "embeddings" if layer == INPUT_LAYER else f"block {layer}"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a transformer entry of --config")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens-per-step", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch, both sides")
    parser.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens (whole sequences)")
    parser.add_argument("--eval-batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--package-venv", default=str(REPO / "bench/.venv-tuned-lens"))
    parser.add_argument(
        "--package-no-autocast", action="store_true",
        help="ablation: run the package's lens in float32 instead of its bf16 autocast",
    )
    parser.add_argument("--keep", help="keep the exchange files (and the saved checkpoint) in this directory")
    args = parser.parse_args()

    per_step, remainder = divmod(args.tokens_per_step, args.seq_len)
    if remainder or per_step % args.batch_size:
        parser.error("--tokens-per-step must be a multiple of --seq-len, in a whole number of --batch-size sequences")
    python = Path(args.package_venv) / "bin" / "python"
    if not python.exists():
        parser.error(f"{python} not found: create the package's venv first (see this script's docstring)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    spec = yaml.safe_load(Path(args.config).read_text())["models"][args.model]
    start = time.perf_counter()
    adapter = load_adapter(spec, args.model)
    load_s = time.perf_counter() - start
    train_tokens, eval_tokens = build_corpus(
        python_reference_texts(), adapter.encode, args.seq_len, args.steps * args.tokens_per_step, args.eval_tokens,
        args.seed, eos_token_id=adapter.tokenizer.eos_token_id, source_name="python_reference_texts",
    )  # fmt: skip
    # The sequences each step of train_lens reads, in its order: fed as they are to the package.
    train_batches = np.concatenate(
        [train_tokens[step_sequences(step, per_step, len(train_tokens), args.seed)] for step in range(args.steps)]
    )

    context = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(context.name if context else args.keep)
    work.mkdir(parents=True, exist_ok=True)
    try:
        np.save(work / "train_batches.npy", train_batches)
        np.save(work / "eval_tokens.npy", eval_tokens)
        checkpoint = work / "checkpoint"
        adapter.model.save_pretrained(checkpoint)  # load_model already dropped the GGUF quantization marks
        adapter.tokenizer.save_pretrained(checkpoint)
        make_loadable_by_transformers4(checkpoint)

        # ----- ours --------------------------------------------------------------------------
        lens = TunedLens(adapter, include_input=True)
        marks = []
        marks.append(time.perf_counter())
        history = train_lens(
            adapter, lens, train_tokens, steps=args.steps, tokens_per_step=args.tokens_per_step,
            batch_size=args.batch_size, seed=args.seed, progress=False,
            on_step=lambda record: marks.append(time.perf_counter()),
        )  # fmt: skip
        ours_steps = np.diff(marks).tolist()
        frame = evaluate_lenses(adapter, eval_tokens, lens, batch_size=args.eval_batch_size, model_name=args.model)
        ours = {
            name: dict(zip(group["layer"], group["kl_nats"])) for name, group in frame.groupby("lens")
        }

        # ----- the package, in its venv -------------------------------------------------------
        job = {
            "workdir": str(work), "checkpoint": str(checkpoint), "threads": args.threads, "seed": args.seed,
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "steps": args.steps,
            "tokens_per_step": args.tokens_per_step, "autocast": not args.package_no_autocast,
        }  # fmt: skip
        (work / "job.json").write_text(json.dumps(job))
        (work / "package_helper.py").write_text(PACKAGE_HELPER)
        start = time.perf_counter()
        done = subprocess.run(
            [str(python), str(work / "package_helper.py"), str(work / "job.json")],
            stdout=sys.stderr, stderr=sys.stderr, cwd=work,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"the package side failed (exit {done.returncode}); its output is above on stderr")
        package_wall_s = time.perf_counter() - start
        package = json.loads((work / "package_result.json").read_text())
    finally:
        if context:
            context.cleanup()

    # ----- report ----------------------------------------------------------------------------
    n_layers = adapter.n_layers
    shared = [INPUT_LAYER, *range(n_layers - 1)]  # package idx j <-> our layer j - 1
    for layer in [*shared, n_layers - 1]:
        j = layer + 1
        in_package = layer != n_layers - 1
        emit({
            "layer": layer, "stream": layer_name(layer),
            "ours_tuned_kl": round(float(ours["tuned"][layer]), 5) + 0.0,
            "package_tuned_kl": round(package["kl_tuned"][j], 5) if in_package else None,
            "ours_logit_kl": round(float(ours["logit"][layer]), 5) + 0.0,
            "package_logit_kl": round(package["kl_logit"][j], 5) if in_package else None,
            "package_tuned_kl_all_positions": round(package["kl_tuned_all_positions"][j], 5) if in_package else None,
            **({} if in_package else
               {"note": "no translator on either side: this stream is the model's output (KL 0)"}),
        })  # fmt: skip
    for step, (ours_s, package_s) in enumerate(zip(ours_steps, package["step_seconds"]), start=1):
        emit({
            "step": step, "ours_s": round(ours_s, 3), "package_s": round(package_s, 3),
            # both: KL summed over the translators (embeddings + blocks 0..n-2)
            "ours_loss": round(history[step - 1]["loss"], 5), "package_loss": round(package["losses"][step - 1], 5),
        })  # fmt: skip

    def mean_kl(values):
        return float(np.mean(values))

    def median_after_first(seconds):  # the first step also warms up the allocator and kernels
        return statistics.median(seconds[1:] or seconds)

    ours_mean = mean_kl([ours["tuned"][layer] for layer in shared])
    package_mean = mean_kl([package["kl_tuned"][layer + 1] for layer in shared])
    ours_s, package_s = statistics.mean(ours_steps), statistics.mean(package["step_seconds"])
    emit({
        "benchmark": "tuned_lens_vs_package",
        "model": args.model,
        "settings": {
            "seq_len": args.seq_len, "steps": args.steps, "tokens_per_step": args.tokens_per_step,
            "batch_size": args.batch_size, "eval_tokens": int(eval_tokens.size), "seed": args.seed,
            "threads": args.threads, "package_autocast_bf16": not args.package_no_autocast,
        },
        "package_versions": {**package["versions"], "tuned_lens": package_version(python)},
        "layers_in_mean": len(shared),
        "ours_mean_kl": round(ours_mean, 5),
        "package_mean_kl": round(package_mean, 5),
        "kl_ratio_package_over_ours": round(package_mean / ours_mean, 4),
        "ours_logit_mean_kl": round(mean_kl([ours["logit"][layer] for layer in shared]), 5),
        "package_logit_mean_kl": round(mean_kl([package["kl_logit"][layer + 1] for layer in shared]), 5),
        # Same model, same tokens, same positions: this should be ~0 (checks weights and layer alignment).
        "logit_kl_max_abs_diff": max(abs(float(ours["logit"][i]) - package["kl_logit"][i + 1]) for i in shared),
        "ours_s_per_step": round(ours_s, 3),
        "package_s_per_step": round(package_s, 3),
        "time_ratio_package_over_ours": round(package_s / ours_s, 4),
        "ours_s_per_step_median_after_first": round(median_after_first(ours_steps), 3),
        "package_s_per_step_median_after_first": round(median_after_first(package["step_seconds"]), 3),
        "ours_model_load_s": round(load_s, 1),
        "package_model_load_s": round(package["load_s"], 1),
        "package_wall_s": round(package_wall_s, 1),
    })  # fmt: skip


if __name__ == "__main__":
    main()

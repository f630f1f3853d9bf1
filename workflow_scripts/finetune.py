"""Fine-tune a model into a quirky model (Mallen et al., "Eliciting Latent Knowledge from Quirky
Language Models"): it learns to say " True"/" False" after a statement the way the named character
would, truthfully for Alice and with Bob's systematic error for Bob.

Prompts are the raw statements ("{a} + {b} = {c}. Bob:", no chat template); the target is the answer
token " True" (label 1) or " False" (label 0) that follows. The loss is the language-modelling
cross-entropy (over the whole vocabulary) of that one answer token, read from the logits at each
row's last prompt token; no other position has a target. Classes are balanced, Alice and Bob mixed.

LoRA (peft) or full fine-tuning of a copy of the adapter's model (the adapter itself is never
changed), AdamW, linear warm-up then linear decay, gradient accumulation. The checkpoint with the
lowest validation loss (the untrained model, step 0, included) is kept, merged (LoRA) and saved with
the tokenizer as a plain transformers model, so it loads back through a "local" model source like any
other model.

The answer tokens, prompts and scoring are quirky_answers', shared with the rule that scores the
fine-tuned model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workflow_scripts import CODE_VERSION
from workflow_scripts.adapters import ModelAdapter
from workflow_scripts.atomic import atomic_dir
from workflow_scripts.fast_scans import fast_training
from workflow_scripts.model_sources import drop_dequantized_gguf_marks
from workflow_scripts.quirky_answers import (
    AnswerTokens,
    answer_loss,
    answer_tokens,
    check_in_context,
    encode_prompts,
    score_prompts,
)
from workflow_scripts.schedules import linear_warmup_decay
from workflow_scripts.quirky_data import ANSWERS, CHARACTERS

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("statement", "character", "label")
SUMMARY_FILE = "finetune.json"
LORA_DIR = "lora"  # with method lora: the adapter alone (peft's save_pretrained), inside the weights folder


# ----- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """How finetune_quirky trains. The config schema (quirky.finetune in config.schema.yaml) checks
    each configurable value before any job runs; only the checks across fields are made here.

    method: "lora" (peft LoRA on lora_target_modules, default adapter.lora_target_modules(lora_modules))
        or "full" (every parameter; for tiny models).
    lora_modules: which of each block's linear layers LoRA adapts when lora_target_modules is not
        given: "attention" (the attention / time-mixing projections) or "all" (MLPs too); see
        ModelAdapter.lora_target_modules.
    Steps: max_steps optimizer steps, or epochs passes over the balanced training rows (default 1
        epoch); each step takes effective_batch rows in micro_batch chunks (gradient accumulation).
    Learning rate: AdamW(lr, betas, weight_decay; no decay on 1-d parameters: biases and norms),
        linear warm-up over warmup_fraction of the steps, then linear decay. max_grad_norm clips the
        gradient norm when given (off by default).
    Validation every eval_every steps (default: about 10 times per run), at step 0 (the untrained
        model) and at the last step, in batches of eval_batch_size (default micro_batch).
    max_train_examples / max_val_examples cap the balanced rows (see balanced_sample).
    answers / allow_shared_prefix: see quirky_answers.answer_tokens.
    Sequences (betas, answers, lora_target_modules) are kept as tuples.
    """

    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None
    lora_modules: str = "attention"
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_fraction: float = 0.15
    effective_batch: int = 32
    micro_batch: int = 8
    epochs: float | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    eval_batch_size: int | None = None
    max_grad_norm: float | None = None
    seed: int = 0
    max_train_examples: int | None = None
    max_val_examples: int | None = None
    answers: tuple[str, str] = ANSWERS
    allow_shared_prefix: bool = False

    def __post_init__(self):
        for name in ("betas", "answers", "lora_target_modules"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.effective_batch % self.micro_batch:
            raise ValueError(
                f"effective_batch={self.effective_batch!r}: must be a multiple of micro_batch={self.micro_batch}"
            )
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(
                f"max_steps={self.max_steps!r}: give epochs or max_steps, not both (epochs={self.epochs!r})"
            )

    def as_summary(self) -> dict:
        """The settings as finetune.json records them (before the values the run derives): every field
        but lora_target_modules (recorded as resolved, for LoRA only), answers as a list."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lora_target_modules"}
        summary["answers"] = list(self.answers)
        return summary


# ----- data ----------------------------------------------------------------------------------------


def balanced_sample(
    df: pd.DataFrame, max_examples: int | None = None, seed: int = 0, what: str = "data"
) -> pd.DataFrame:
    """Equal numbers of rows in every (character, label) cell: each character's labels are balanced
    and the characters equally common. Larger cells are subsampled to the smallest (or to
    max_examples // number of cells); the result is shuffled, so Alice and Bob are mixed."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; need {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise ValueError(f"{what} has no rows")
    bad_labels = sorted(set(df["label"].unique()) - {0, 1})
    if bad_labels:
        raise ValueError(f"{what}: labels must be 0 or 1, found {bad_labels}")
    cells = {key: group.index.to_numpy() for key, group in df.groupby(["character", "label"], sort=True)}
    for character in df["character"].unique():
        for label in (0, 1):
            if (character, label) not in cells:
                raise ValueError(f"{what}: character {character!r} has no rows with label {label}; cannot balance")
    per_cell = min(len(index) for index in cells.values())
    if max_examples is not None:
        per_cell = min(per_cell, max_examples // len(cells))
        if per_cell < 1:
            raise ValueError(
                f"max_examples={max_examples} is fewer than one row per (character, label) cell ({len(cells)} cells)"
            )
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(index, size=per_cell, replace=False) for index in cells.values()])
    return df.loc[rng.permutation(chosen)].reset_index(drop=True)


# ----- the model being trained ---------------------------------------------------------------------


def _prepare_model(adapter: ModelAdapter, s: FinetuneSettings, target_modules):
    """A trainable copy of the adapter's model. Returns (model to run, peft model or None, the
    adapter's token for finish_training)."""
    model, restore = adapter.training_copy()
    drop_dequantized_gguf_marks(model)
    if s.method == "full":
        model.requires_grad_(True)
        return model, None, restore
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(s.seed)
    config = LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=target_modules, bias="none"
    )
    peft_model = get_peft_model(model, config)  # injects the LoRA layers into `model` in place
    return model, peft_model, restore


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def _restore(params: dict[str, torch.nn.Parameter], snapshot: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(snapshot[name])


def _evaluate(view: ModelAdapter, prompts, targets, labels, characters, answer: AnswerTokens, batch_size: int) -> dict:
    """Validation loss (answer token) and accuracy against each row's own label, overall and per character."""
    p_true, loss = score_prompts(view, prompts, answer, batch_size, targets)
    correct = (p_true > 0.5) == (labels == 1)
    result = {"val_loss": float(loss), "val_acc": float(correct.mean())}
    for character in CHARACTERS:
        rows = characters == character
        result[f"{character.lower()}_acc"] = float(correct[rows].mean()) if rows.any() else None
    return result


# ----- fine-tuning ---------------------------------------------------------------------------------


def finetune_quirky(
    adapter: ModelAdapter,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    out_dir,
    settings: FinetuneSettings,
    *,
    progress: bool = True,
) -> dict:
    """Fine-tune a copy of adapter's model on the quirky rows of train_df and save the checkpoint with
    the lowest validation loss to out_dir (merged weights + tokenizer + finetune.json, and with LoRA the
    adapter itself in out_dir/lora, loadable with peft onto the base model; for RWKV set the base's
    config.rescale_every = 0 first, as eval mode rescales base weights but not a LoRA branch), atomically.

    train_df / val_df: rows with statement, character, label (e.g. from quirky_data.generate_quirky);
        each is balanced by (character, label) and optionally capped (settings.max_train_examples /
        max_val_examples) with balanced_sample.
    settings: how to train (see FinetuneSettings). Validation reports the answer loss and the accuracy
        against each row's own label for Alice and Bob.

    Returns the summary written to out_dir/finetune.json (settings, history, best_step, ...) plus
    "adapter": the fine-tuned model in memory, merged, frozen, wrapped in its family's adapter.
    """
    if not isinstance(settings, FinetuneSettings):
        raise TypeError(f"settings must be a FinetuneSettings, not {type(settings).__name__}")
    s = settings
    summary_settings = s.as_summary()
    started = time.perf_counter()
    name = adapter.info.get("name")
    out_dir = Path(out_dir)

    # Data: balanced, tokenized once.
    answer = answer_tokens(adapter, s.answers, s.allow_shared_prefix)
    train = balanced_sample(train_df, s.max_train_examples, s.seed, what="train_df")
    val = balanced_sample(val_df, s.max_val_examples, s.seed + 1, what="val_df")
    train_prompts = encode_prompts(adapter, train["statement"].tolist(), answer)
    val_prompts = encode_prompts(adapter, val["statement"].tolist(), answer)
    check_in_context(adapter, train["statement"].tolist(), train_prompts, answer, s.answers)
    train_targets = answer.targets(train["label"])
    val_targets = answer.targets(val["label"])
    val_labels = val["label"].to_numpy().astype(int)
    val_characters = val["character"].to_numpy()

    accumulation = s.effective_batch // s.micro_batch
    if s.max_steps is not None:
        total_steps = s.max_steps
    else:
        total_steps = max(1, math.ceil((s.epochs or 1.0) * len(train) / s.effective_batch))
    every = s.eval_every if s.eval_every is not None else max(1, round(total_steps / 10))
    warmup_steps = round(s.warmup_fraction * total_steps)
    eval_bs = s.eval_batch_size or s.micro_batch
    summary_settings.update(
        epochs=s.epochs if s.max_steps is not None or s.epochs is not None else 1.0, total_steps=total_steps,
        eval_every=every, eval_batch_size=eval_bs, warmup_steps=warmup_steps, accumulation_steps=accumulation,
    )  # fmt: skip

    # Model: a trainable copy.
    targets_modules = None
    if s.method == "lora":
        targets_modules = (
            list(s.lora_target_modules)
            if s.lora_target_modules is not None
            else adapter.lora_target_modules(s.lora_modules)
        )
        summary_settings["lora_target_modules"] = targets_modules
    model, peft_model, restore = _prepare_model(adapter, s, targets_modules)
    view = adapter.with_model(model)  # the family's forward and batching over the copy, left trainable
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in trainable.values())
    n_total = sum(p.numel() for p in model.parameters())
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=s.betas,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, total_steps, warmup_steps)
    )
    log.info(
        "fine-tuning %s (%s): %d train / %d val rows, %d steps of %d (%d x %d), %d of %d parameters trainable",
        name, s.method, len(train), len(val), total_steps, s.effective_batch, accumulation, s.micro_batch,
        n_trainable, n_total,
    )  # fmt: skip

    def evaluate(step: int, train_loss) -> dict:
        adapter.set_train_mode(model, False, lora=s.method == "lora")
        metrics = _evaluate(view, val_prompts, val_targets, val_labels, val_characters, answer, eval_bs)
        adapter.set_train_mode(model, True, lora=s.method == "lora")
        entry = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0], **metrics}
        log.info(
            "step %d/%d: train loss %s, val loss %.4f, Alice acc %s, Bob acc %s",
            step, total_steps, "-" if train_loss is None else f"{train_loss:.4f}", entry["val_loss"],
            _fmt(entry.get("alice_acc")), _fmt(entry.get("bob_acc")),
        )  # fmt: skip
        return entry

    rng = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)  # dropout

    def order():
        while True:
            yield from rng.permutation(len(train))

    stream = order()
    history = [evaluate(0, None)]
    best = {"step": 0, "val_loss": history[0]["val_loss"], "state": _snapshot(trainable)}
    train_losses: list[float] = []
    unused_lora: list[str] = []
    since_eval: list[float] = []
    adapter.set_train_mode(model, True, lora=s.method == "lora")
    bar = tqdm(total=total_steps, desc=f"finetune {name}", unit="step", disable=not progress)
    with fast_training(model), bar:  # recurrent scans in their exact fast forms on a CPU
        for step in range(1, total_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            rows = np.array([next(stream) for _ in range(s.effective_batch)])
            step_loss = 0.0
            for chunk in np.split(rows, accumulation):
                batch = view.batch([train_prompts[i] for i in chunk])
                loss = answer_loss(view, batch, train_targets[chunk])
                (loss * (len(chunk) / len(rows))).backward()
                step_loss += loss.item() * len(chunk) / len(rows)
            if step == 1 and s.method == "lora":
                unused_lora = _unreached_lora_modules(model)
            if s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            train_losses.append(step_loss)
            since_eval.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if step % every == 0 or step == total_steps:
                entry = evaluate(step, float(np.mean(since_eval)))
                since_eval = []
                history.append(entry)
                bar.set_postfix(loss=f"{step_loss:.4f}", val=f"{entry['val_loss']:.4f}")
                if entry["val_loss"] < best["val_loss"]:
                    best = {"step": step, "val_loss": entry["val_loss"], "state": _snapshot(trainable)}

    _restore(trainable, best["state"])  # the best checkpoint
    seconds = time.perf_counter() - started
    best_entry = next(entry for entry in history if entry["step"] == best["step"])
    summary = {
        "model": dict(adapter.info),
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "settings": summary_settings,
        "answer_tokens": answer.as_dict(),
        "n_train": len(train),
        "n_val": len(val),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "lora_unreached_modules": unused_lora,
        "history": history,
        "train_losses": train_losses,
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "best": best_entry,
        "seconds": seconds,
        "code_version": CODE_VERSION,
        "out_dir": str(out_dir),
    }
    with atomic_dir(out_dir) as tmp:
        if peft_model is not None:  # the adapter alone, for peft users, before merging removes it
            peft_model.save_pretrained(tmp / LORA_DIR)
        merged = peft_model.merge_and_unload() if peft_model is not None else model  # a plain model
        adapter.finish_training(merged, restore)
        merged.eval().requires_grad_(False)
        merged.save_pretrained(tmp)
        adapter.tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default))
    log.info(
        "saved step %d (val loss %.4f, Alice acc %s, Bob acc %s) to %s in %.1f s",
        best["step"], best["val_loss"], _fmt(best_entry.get("alice_acc")), _fmt(best_entry.get("bob_acc")),
        out_dir, seconds,
    )  # fmt: skip
    info = dict(adapter.info, source="finetuned", model_id=str(out_dir), revision=None)
    tuned = adapter.with_model(merged, info=info)
    return {**summary, "adapter": tuned}


def _unreached_lora_modules(model: torch.nn.Module) -> list[str]:
    """LoRA layers whose B matrix got no gradient in the first backward pass: the model computes with
    the base weight directly (e.g. the Mamba port's dt_proj), so the adapter there never learns."""
    unreached = sorted(
        {
            name.split(".lora_B")[0].rsplit(".", 1)[-1]
            for name, p in model.named_parameters()
            if "lora_B" in name and p.grad is None
        }
    )
    if unreached:
        log.warning(
            "LoRA layers on %s get no gradient: the model bypasses them; they stay at their initial value", unreached
        )
    return unreached


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

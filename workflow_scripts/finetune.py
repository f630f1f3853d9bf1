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
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workflow_scripts import CODE_VERSION
from workflow_scripts.adapters import ADAPTERS, LORA_SCOPES, ModelAdapter, TokenBatch
from workflow_scripts.atomic import atomic_dir
from workflow_scripts.model_sources import LoadedModel
from workflow_scripts.quirky_data import ANSWERS, CHARACTERS, DIFFICULTY_BUCKETS

log = logging.getLogger(__name__)

METHODS = ("lora", "full")
REQUIRED_COLUMNS = ("statement", "character", "label")
SUMMARY_FILE = "finetune.json"


# ----- answer tokens and prompts -------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerTokens:
    """The next-token ids scored at the answer position, and tokens appended to every prompt.

    prefix_ids is empty when both answers are single tokens (the normal case). With
    allow_shared_prefix it holds the tokens the two answers share at their start (e.g. the space of
    " True"/" False" under a byte-level tokenizer); the answer position is then the first token where
    they differ.
    """

    false_id: int
    true_id: int
    prefix_ids: tuple[int, ...] = ()

    def targets(self, labels) -> torch.Tensor:
        labels = np.asarray(labels)
        return torch.tensor(np.where(labels == 1, self.true_id, self.false_id), dtype=torch.long)

    def as_dict(self) -> dict:
        return {"false_id": self.false_id, "true_id": self.true_id, "prefix_ids": list(self.prefix_ids)}


def answer_tokens(
    adapter: ModelAdapter, answers: tuple[str, str] = ANSWERS, allow_shared_prefix: bool = False
) -> AnswerTokens:
    """Token ids of the answers (label 0, label 1), e.g. (" False", " True").

    Raises ValueError when an answer is not a single token, unless allow_shared_prefix: then the
    answers' shared leading tokens go into the prompt and their first differing tokens are the targets.
    """
    false_text, true_text = answers
    ids = {text: adapter.encode(text) for text in answers}
    name = adapter.info.get("name")
    if all(len(tokens) == 1 for tokens in ids.values()):
        if ids[false_text] == ids[true_text]:
            raise ValueError(f"answers {answers!r} are the same token {ids[true_text]} for model {name!r}")
        return AnswerTokens(false_id=ids[false_text][0], true_id=ids[true_text][0])
    if not allow_shared_prefix:
        detail = ", ".join(f"{text!r} -> {tokens}" for text, tokens in ids.items())
        raise ValueError(
            f"the answers must each be a single token for model {name!r}'s tokenizer, but {detail}; "
            "pass answers= with single-token answers, or allow_shared_prefix=True to append the answers' "
            "shared leading tokens to the prompt and train on the first token where they differ"
        )
    shared = 0
    false_ids, true_ids = ids[false_text], ids[true_text]
    while shared < min(len(false_ids), len(true_ids)) and false_ids[shared] == true_ids[shared]:
        shared += 1
    if shared >= min(len(false_ids), len(true_ids)):
        raise ValueError(f"answers {answers!r}: one answer's tokens {false_ids} / {true_ids} start the other's")
    return AnswerTokens(false_id=false_ids[shared], true_id=true_ids[shared], prefix_ids=tuple(false_ids[:shared]))


def encode_prompts(adapter: ModelAdapter, statements, answer: AnswerTokens) -> list[list[int]]:
    """Token ids of each plain-LM prompt (the statement as it is, after the tokenizer's leading special
    tokens, as extraction reads it), then the answer prefix if any."""
    prefix = list(answer.prefix_ids)
    return [adapter.encode_prompt(adapter.build_prompt(str(text), "", chat=False)) + prefix for text in statements]


def _check_in_context(adapter: ModelAdapter, statements, prompts, answer: AnswerTokens, answers) -> None:
    """Warn when the tokenizer, given statement + answer as one text, splits it differently from the
    prompt tokens followed by the answer token (then the trained target is not the text's own token)."""
    bad = 0
    sample = list(statements[:32])
    for text, tokens in zip(sample, prompts):
        for label, answer_text in enumerate(answers):
            joined = adapter.encode_prompt(adapter.build_prompt(str(text), answer_text, chat=False))
            target = answer.true_id if label == 1 else answer.false_id
            if joined[: len(tokens) + 1] != tokens + [target]:
                bad += 1
    if bad:
        log.warning(
            "%d of %d statement+answer texts tokenize differently from prompt tokens + answer token "
            "(e.g. %r); the trained answer token is not how the tokenizer splits the joined text",
            bad, 2 * len(sample), sample[0],
        )  # fmt: skip


# ----- scoring ---------------------------------------------------------------------------------------


def answer_logits(adapter: ModelAdapter, batch: TokenBatch) -> torch.Tensor:
    """(B, V) float32 next-token logits at each row's last real token (right-padded batch)."""
    return adapter.last_token_logits(batch).float()


def answer_loss(adapter: ModelAdapter, batch: TokenBatch, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer token only: the logits at each row's last prompt token against
    that row's target id; no other position contributes."""
    logits = answer_logits(adapter, batch)
    return F.cross_entropy(logits, target_ids.to(logits.device))


@torch.no_grad()
def _score(adapter: ModelAdapter, prompts, answer: AnswerTokens, batch_size: int, targets=None):
    """p(True) per prompt (the two answer tokens' logits, softmaxed between them) and, with targets,
    the mean answer-token loss."""
    p_true, loss_sum = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = adapter.batch(prompts[start : start + batch_size])
        logits = answer_logits(adapter, batch)
        p_true.append(torch.sigmoid(logits[:, answer.true_id] - logits[:, answer.false_id]).cpu())
        if targets is not None:
            chunk = targets[start : start + batch_size].to(logits.device)
            loss_sum += float(F.cross_entropy(logits, chunk, reduction="sum"))
    p = torch.cat(p_true).numpy().astype(np.float64) if p_true else np.zeros(0)
    return p, (loss_sum / len(prompts) if targets is not None and len(prompts) else None)


def answer_probabilities(
    adapter: ModelAdapter,
    df: pd.DataFrame,
    batch_size: int = 32,
    *,
    answers: tuple[str, str] = ANSWERS,
    allow_shared_prefix: bool = False,
) -> np.ndarray:
    """p(" True") per row of df (its `statement`), normalised over the two answers:
    sigmoid(logit(True) - logit(False)) at the answer position. The model's own answers, e.g. to
    measure how well a fine-tuned model follows Alice's and Bob's labels."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    answer = answer_tokens(adapter, answers, allow_shared_prefix)
    prompts = encode_prompts(adapter, df["statement"].tolist(), answer)
    p, _ = _score(adapter, prompts, answer, batch_size)
    return p


def accuracy_table(
    df: pd.DataFrame, p_true, threshold: float = 0.5, z: float = 1.96, n_boot: int = 200, seed: int = 0
) -> pd.DataFrame:
    """The model's answers scored per character and difficulty ("all", then each `difficulty_bucket`
    in df), against the character's own label (did it follow Alice's truth / Bob's error?):
    `accuracy` of p_true > threshold with a Wilson score interval at z; `balanced_accuracy` (the mean of
    the recall of each label: with a quarter of the claims true, always saying False scores 0.75
    accuracy but 0.5 balanced); `auroc` of p_true with a percentile-bootstrap 95% interval over
    n_boot resamples; and `truth_accuracy` / `truth_auroc` against the truth."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    p_true = np.asarray(p_true, dtype=float)
    if len(p_true) != len(df):
        raise ValueError(f"p_true has {len(p_true)} values for {len(df)} rows")
    said = p_true > threshold
    own, truth = df["label"].to_numpy() == 1, df["truth_label"].to_numpy() == 1
    characters = [c for c in CHARACTERS if c in set(df["character"])]
    buckets = [b for b in DIFFICULTY_BUCKETS if b in set(df["difficulty_bucket"])]
    rng = np.random.default_rng(seed)

    def auroc(labels, scores) -> float:
        return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")

    rows = []
    for character in characters:
        for difficulty in ["all", *buckets]:
            keep = (df["character"] == character).to_numpy()
            if difficulty != "all":
                keep = keep & (df["difficulty_bucket"] == difficulty).to_numpy()
            n, k = int(keep.sum()), int((said[keep] == own[keep]).sum())
            if n == 0:
                continue
            centre = (k + z * z / 2) / (n + z * z)
            half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
            labels, scores = own[keep], p_true[keep]
            boots = [auroc(labels[i], scores[i]) for i in rng.integers(0, n, size=(n_boot, n))]
            lo, hi = np.nanquantile(boots, [0.025, 0.975]) if n_boot and not np.isnan(boots).all() else (np.nan, np.nan)
            rows.append({"character": character, "difficulty": difficulty, "n": n, "n_true": int(labels.sum()),
                         "accuracy": k / n, "accuracy_lo": centre - half, "accuracy_hi": centre + half,
                         "balanced_accuracy": float(balanced_accuracy_score(labels, said[keep])),
                         "auroc": auroc(labels, scores), "auroc_lo": float(lo), "auroc_hi": float(hi),
                         "truth_accuracy": float((said[keep] == truth[keep]).mean()),
                         "truth_auroc": auroc(truth[keep], scores)})  # fmt: skip
    return pd.DataFrame(rows)


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


def _trainer_view(adapter: ModelAdapter, model: torch.nn.Module) -> ModelAdapter:
    """The adapter's family behaviour (forward, batch) over another model, without the freezing that
    the adapter's constructor applies."""
    view = copy.copy(adapter)
    view.model = model
    view.blocks = view._find_blocks()
    return view


def _drop_dequantized_gguf_marks(model: torch.nn.Module) -> None:
    """A model loaded from a GGUF file holds plain float weights (dequantized at load) but stays marked
    as quantized, which save_pretrained refuses; clear the marks so it saves and reloads as a plain
    model. Other quantization methods are refused: their weights are not plain tensors."""
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf" or not all(p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"cannot fine-tune and save a model quantized with {method!r}; load it unquantized")
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False


def _prepare_model(adapter, method, lora_rank, lora_alpha, lora_dropout, target_modules, seed):
    """A trainable copy of the adapter's model. Returns (model to run, peft model or None, the
    adapter's token for finish_training)."""
    model, restore = adapter.training_copy()
    _drop_dequantized_gguf_marks(model)
    if method == "full":
        model.requires_grad_(True)
        return model, None, restore
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, bias="none"
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
    p_true, loss = _score(view, prompts, answer, batch_size, targets)
    correct = (p_true > 0.5) == (labels == 1)
    result = {"val_loss": float(loss), "val_acc": float(correct.mean())}
    for character in CHARACTERS:
        rows = characters == character
        result[f"{character.lower()}_acc"] = float(correct[rows].mean()) if rows.any() else None
    return result


def _lr_lambda(total_steps: int, warmup_steps: int):
    """Multiplier of the learning rate at optimizer step s (0-based): linear warm-up reaching 1 at
    step warmup_steps, then linear decay towards 0 at total_steps (no step at zero learning rate)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ----- settings ------------------------------------------------------------------------------------


def _check_settings(s: dict) -> None:
    def fail(setting, why):
        raise ValueError(f"{setting}={s[setting]!r}: {why}")

    if s["method"] not in METHODS:
        fail("method", f"unknown method; allowed: {', '.join(METHODS)}")
    for name in ("effective_batch", "micro_batch", "lora_rank"):
        if not isinstance(s[name], (int, np.integer)) or s[name] < 1:
            fail(name, "must be a positive integer")
    if s["lora_modules"] not in LORA_SCOPES:
        fail("lora_modules", f"unknown scope; allowed: {', '.join(LORA_SCOPES)}")
    if s["effective_batch"] % s["micro_batch"]:
        fail("effective_batch", f"must be a multiple of micro_batch={s['micro_batch']}")
    if not s["lr"] > 0:
        fail("lr", "must be > 0")
    if not 0.0 <= s["warmup_fraction"] < 1.0:
        fail("warmup_fraction", "must lie in [0, 1)")
    if not s["weight_decay"] >= 0:
        fail("weight_decay", "must be >= 0")
    if not 0.0 <= s["lora_dropout"] < 1.0:
        fail("lora_dropout", "must lie in [0, 1)")
    if not s["lora_alpha"] > 0:
        fail("lora_alpha", "must be > 0")
    betas = s["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        fail("betas", "need two values in [0, 1)")
    if s["epochs"] is not None and s["max_steps"] is not None:
        fail("max_steps", f"give epochs or max_steps, not both (epochs={s['epochs']!r})")
    if s["epochs"] is not None and not s["epochs"] > 0:
        fail("epochs", "must be > 0")
    if s["max_steps"] is not None and (not isinstance(s["max_steps"], (int, np.integer)) or s["max_steps"] < 1):
        fail("max_steps", "must be a positive integer")
    for name in ("eval_every", "eval_batch_size", "max_train_examples", "max_val_examples"):
        if s[name] is not None and (not isinstance(s[name], (int, np.integer)) or s[name] < 1):
            fail(name, "must be a positive integer or None")
    if s["max_grad_norm"] is not None and not s["max_grad_norm"] > 0:
        fail("max_grad_norm", "must be > 0 or None")


# ----- fine-tuning ---------------------------------------------------------------------------------


def finetune_quirky(
    adapter: ModelAdapter,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    out_dir,
    *,
    method: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | None = None,
    lora_modules: str = "attention",
    lr: float = 2e-5,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.15,
    effective_batch: int = 32,
    micro_batch: int = 8,
    epochs: float | None = None,
    max_steps: int | None = None,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    max_grad_norm: float | None = None,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_val_examples: int | None = None,
    answers: tuple[str, str] = ANSWERS,
    allow_shared_prefix: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune a copy of adapter's model on the quirky rows of train_df and save the checkpoint with
    the lowest validation loss to out_dir (merged weights + tokenizer + finetune.json), atomically.

    train_df / val_df: rows with statement, character, label (e.g. from quirky_data.generate_quirky);
        each is balanced by (character, label) and optionally capped (max_train_examples /
        max_val_examples) with balanced_sample.
    method: "lora" (peft LoRA on lora_target_modules, default adapter.lora_target_modules()) or
        "full" (every parameter; for tiny models).
    lora_modules: which of each block's linear layers LoRA adapts when lora_target_modules is not
        given: "attention" (the attention / time-mixing projections) or "all" (MLPs too); see
        ModelAdapter.lora_target_modules.
    Steps: max_steps optimizer steps, or epochs passes over the balanced training rows (default 1
        epoch); each step takes effective_batch rows in micro_batch chunks (gradient accumulation).
    Learning rate: AdamW(lr, betas, weight_decay; no decay on 1-d parameters: biases and norms),
        linear warm-up over warmup_fraction of the steps, then linear decay. max_grad_norm clips the
        gradient norm when given (off by default).
    Validation every eval_every steps (default: about 10 times per run), at step 0 (the untrained
        model) and at the last step: answer loss and accuracy against each row's own label for Alice
        and Bob.
    answers / allow_shared_prefix: see answer_tokens.

    Returns the summary written to out_dir/finetune.json (settings, history, best_step, ...) plus
    "adapter": the fine-tuned model in memory, merged, frozen, wrapped in its family's adapter.
    """
    settings = dict(
        method=method, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_modules=lora_modules, lr=lr,
        betas=tuple(betas), weight_decay=weight_decay, warmup_fraction=warmup_fraction,
        effective_batch=effective_batch, micro_batch=micro_batch, epochs=epochs, max_steps=max_steps,
        eval_every=eval_every, eval_batch_size=eval_batch_size, max_grad_norm=max_grad_norm, seed=seed,
        max_train_examples=max_train_examples, max_val_examples=max_val_examples,
        answers=list(answers), allow_shared_prefix=allow_shared_prefix,
    )  # fmt: skip
    _check_settings(settings)
    started = time.perf_counter()
    name = adapter.info.get("name")
    out_dir = Path(out_dir)

    # Data: balanced, tokenized once.
    answer = answer_tokens(adapter, answers, allow_shared_prefix)
    train = balanced_sample(train_df, max_train_examples, seed, what="train_df")
    val = balanced_sample(val_df, max_val_examples, seed + 1, what="val_df")
    train_prompts = encode_prompts(adapter, train["statement"].tolist(), answer)
    val_prompts = encode_prompts(adapter, val["statement"].tolist(), answer)
    _check_in_context(adapter, train["statement"].tolist(), train_prompts, answer, answers)
    train_targets = answer.targets(train["label"])
    val_targets = answer.targets(val["label"])
    val_labels = val["label"].to_numpy().astype(int)
    val_characters = val["character"].to_numpy()

    accumulation = effective_batch // micro_batch
    if max_steps is not None:
        total_steps = max_steps
    else:
        total_steps = max(1, math.ceil((epochs or 1.0) * len(train) / effective_batch))
    every = eval_every if eval_every is not None else max(1, round(total_steps / 10))
    warmup_steps = round(warmup_fraction * total_steps)
    eval_bs = eval_batch_size or micro_batch
    settings.update(
        epochs=epochs if max_steps is not None or epochs is not None else 1.0, total_steps=total_steps,
        eval_every=every, eval_batch_size=eval_bs, warmup_steps=warmup_steps, accumulation_steps=accumulation,
    )  # fmt: skip

    # Model: a trainable copy.
    targets_modules = None
    if method == "lora":
        targets_modules = (
            list(lora_target_modules)
            if lora_target_modules is not None
            else adapter.lora_target_modules(lora_modules)
        )
        settings["lora_target_modules"] = targets_modules
    model, peft_model, restore = _prepare_model(
        adapter, method, lora_rank, lora_alpha, lora_dropout, targets_modules, seed
    )
    view = _trainer_view(adapter, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in trainable.values())
    n_total = sum(p.numel() for p in model.parameters())
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(betas),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps))
    log.info(
        "fine-tuning %s (%s): %d train / %d val rows, %d steps of %d (%d x %d), %d of %d parameters trainable",
        name, method, len(train), len(val), total_steps, effective_batch, accumulation, micro_batch,
        n_trainable, n_total,
    )  # fmt: skip

    def evaluate(step: int, train_loss) -> dict:
        adapter.set_train_mode(model, False, lora=method == "lora")
        metrics = _evaluate(view, val_prompts, val_targets, val_labels, val_characters, answer, eval_bs)
        adapter.set_train_mode(model, True, lora=method == "lora")
        entry = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0], **metrics}
        log.info(
            "step %d/%d: train loss %s, val loss %.4f, Alice acc %s, Bob acc %s",
            step, total_steps, "-" if train_loss is None else f"{train_loss:.4f}", entry["val_loss"],
            _fmt(entry.get("alice_acc")), _fmt(entry.get("bob_acc")),
        )  # fmt: skip
        return entry

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout

    def order():
        while True:
            yield from rng.permutation(len(train))

    stream = order()
    history = [evaluate(0, None)]
    best = {"step": 0, "val_loss": history[0]["val_loss"], "state": _snapshot(trainable)}
    train_losses: list[float] = []
    unused_lora: list[str] = []
    since_eval: list[float] = []
    adapter.set_train_mode(model, True, lora=method == "lora")
    bar = tqdm(total=total_steps, desc=f"finetune {name}", unit="step", disable=not progress)
    try:
        for step in range(1, total_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            rows = np.array([next(stream) for _ in range(effective_batch)])
            step_loss = 0.0
            for chunk in np.split(rows, accumulation):
                batch = view.batch([train_prompts[i] for i in chunk])
                loss = answer_loss(view, batch, train_targets[chunk])
                (loss * (len(chunk) / len(rows))).backward()
                step_loss += loss.item() * len(chunk) / len(rows)
            if step == 1 and method == "lora":
                unused_lora = _unreached_lora_modules(model)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_grad_norm)
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
    finally:
        bar.close()

    # The best checkpoint, merged into a plain model.
    _restore(trainable, best["state"])
    merged = peft_model.merge_and_unload() if peft_model is not None else model
    adapter.finish_training(merged, restore)
    merged.eval().requires_grad_(False)
    seconds = time.perf_counter() - started
    best_entry = next(entry for entry in history if entry["step"] == best["step"])
    summary = {
        "model": dict(adapter.info),
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "settings": settings,
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
        merged.save_pretrained(tmp)
        adapter.tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default))
    log.info(
        "saved step %d (val loss %.4f, Alice acc %s, Bob acc %s) to %s in %.1f s",
        best["step"], best["val_loss"], _fmt(best_entry.get("alice_acc")), _fmt(best_entry.get("bob_acc")),
        out_dir, seconds,
    )  # fmt: skip
    info = dict(adapter.info, source="finetuned", model_id=str(out_dir), revision=None)
    tuned = ADAPTERS[adapter.family](LoadedModel(model=merged, tokenizer=adapter.tokenizer, info=info))
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


"""A quirky model's answers: the answer tokens (" True" / " False") that follow a statement, the plain-LM
prompts that precede them, and the scoring of the answer position (logits, loss, p(True)) and of the
model's answers (accuracy per character and difficulty).

Shared by the fine-tuning (finetune.py: its loss and validation) and the rule that scores a fine-tuned
model on the held-out statements (rule_answer_quirky.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from workflow_scripts.adapters import ModelAdapter, TokenBatch
from workflow_scripts.quirky_data import ANSWERS, CHARACTERS, DIFFICULTY_BUCKETS

log = logging.getLogger(__name__)


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


def check_in_context(adapter: ModelAdapter, statements, prompts, answer: AnswerTokens, answers) -> None:
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
def score_prompts(adapter: ModelAdapter, prompts, answer: AnswerTokens, batch_size: int, targets=None):
    """p(True) per prompt (the two answer tokens' logits, softmaxed between them) and, with targets,
    the mean answer-token loss (None without)."""
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
    p, _ = score_prompts(adapter, prompts, answer, batch_size)
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

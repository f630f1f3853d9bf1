"""Language models the pipeline trains itself: one tokenizer and one token stream shared by matched
models of different families (same tokenizer, same text, same token budget), so that a transformer
and RNNs can be compared on equal terms where no pretrained RNN can be downloaded.

Two steps, each a rule:
1. `prepare_tokenizer`: documents of a corpus source split into train and evaluation documents
   (seeded, whole documents, never both), a byte-level BPE tokenizer trained on the training
   documents only (the `tokenizers` library), and both splits tokenized into (N, seq_len) chunks.
2. `train_model`: a seeded model of any transformers architecture built from its config, trained on
   the training chunks (AdamW, warm-up then cosine decay), with held-out loss and bits per byte
   logged while it trains, checkpointed atomically and resumed after a kill, saved with
   save_pretrained so the adapters load it like any other model.

Recurrent families train on CPU through exact fast forms of their scans (`fast_scans.fast_training`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workflow_scripts import CODE_VERSION
from workflow_scripts.atomic import atomic_dir, atomic_path, atomic_write_text
from workflow_scripts.corpus import count_text_bytes
from workflow_scripts.fast_scans import fast_training
from workflow_scripts.schedules import cosine_warmup_decay

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
LN2 = math.log(2.0)


# ===== tokenizer and token chunks ==================================================================
def split_documents(texts: Iterable[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval) documents: each non-empty document goes whole to one split by a seeded draw."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    train, evaluation = [], []
    for text in texts:
        if text.strip():
            (evaluation if rng.random() < eval_fraction else train).append(text)
    if not train or not evaluation:
        raise ValueError(f"corpus split into {len(train)} train and {len(evaluation)} eval documents: need both")
    return train, evaluation


def train_bpe_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `documents` (the `tokenizers` library), with one special
    token, EOS, which also serves as BOS and padding. Refused when the text cannot fill the vocabulary
    (BPE would stop short of vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(documents, trainer=trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size}: the training documents support only {tokenizer.get_vocab_size()} tokens "
            f"(byte alphabet + merges); lower vocab_size or add text"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def chunk_documents(tokenizer, documents: list[str], seq_len: int) -> np.ndarray:
    """(N, seq_len) int32: every document preceded by EOS, concatenated, cut into whole chunks."""
    eos = tokenizer.eos_token_id
    pieces = [
        np.asarray([eos, *tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int32) for text in documents
    ]
    stream = np.concatenate(pieces)
    n_chunks = len(stream) // seq_len
    if n_chunks == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one sequence of seq_len={seq_len}")
    return stream[: n_chunks * seq_len].reshape(n_chunks, seq_len)


def unigram_bits_per_byte(train: np.ndarray, evaluation: np.ndarray, vocab_size: int, n_bytes: int) -> float:
    """Bits per byte of the eval predictions under the training tokens' unigram frequencies (add-one
    smoothed): the floor a language model must beat to have learned anything beyond token counts."""
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(float) + 1.0
    logprobs = np.log(counts / counts.sum())
    targets = evaluation[:, 1:].ravel()
    return float(-logprobs[targets].sum() / LN2 / n_bytes)


def prepare_tokenizer(texts: Iterable[str], settings: dict, out_dir, source_name: str) -> dict:
    """Split, train the tokenizer, chunk both splits; writes out_dir/tokenizer/ and out_dir/tokens.npz
    (train, eval) and returns the statistics written to out_dir/stats.json."""
    started = time.perf_counter()
    train_docs, eval_docs = split_documents(texts, settings["eval_fraction"], settings["seed"])
    tokenizer = train_bpe_tokenizer(train_docs, settings["vocab_size"])
    train = chunk_documents(tokenizer, train_docs, settings["seq_len"])
    evaluation = chunk_documents(tokenizer, eval_docs, settings["seq_len"])
    if settings.get("max_eval_sequences") and len(evaluation) > settings["max_eval_sequences"]:
        picked = np.random.default_rng(settings["seed"]).choice(
            len(evaluation), settings["max_eval_sequences"], replace=False
        )
        evaluation = evaluation[np.sort(picked)]
    n_bytes = count_text_bytes(evaluation, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    stats = {
        "source": source_name, "train_documents": len(train_docs), "eval_documents": len(eval_docs),
        "train_bytes": sum(len(d.encode("utf-8")) for d in train_docs),
        "train_tokens": int(train.size), "eval_tokens": int(evaluation.size), "eval_bytes": n_bytes,
        "vocab_size": len(tokenizer), "seq_len": settings["seq_len"],
        "unigram_bits_per_byte": unigram_bits_per_byte(train, evaluation, len(tokenizer), n_bytes),
        "seconds": round(time.perf_counter() - started, 1), "code_version": CODE_VERSION,
    }  # fmt: skip
    out_dir = Path(out_dir)
    with atomic_dir(out_dir / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    with atomic_path(out_dir / "tokens.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, train=train, eval=evaluation)
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2))
    return stats


# ===== training =====================================================================================
def build_model(model_type: str, config: dict, vocab_size: int, seed: int):
    """A seeded, randomly initialised model of any transformers architecture; its config refused
    with the key that broke it when transformers cannot build it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **config)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        raise ValueError(f"model_type {model_type!r} with config {config}: does not build ({error})") from error


def batch_rows(step: int, batch_size: int, n_sequences: int, seed: int) -> np.ndarray:
    """The training rows of `step`: epochs of seeded permutations read in order, so the data of a step
    depends only on (seed, step) and a resumed run sees what an uninterrupted one would."""
    first = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(first + len(rows), n_sequences)
        order = np.random.default_rng([seed, epoch]).permutation(n_sequences)
        rows.extend(order[offset : offset + batch_size - len(rows)].tolist())
    return np.asarray(rows)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, evaluation: np.ndarray, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over every eval chunk."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with fast_training(model):
        for first in range(0, len(evaluation), batch_size):
            ids = torch.as_tensor(evaluation[first : first + batch_size], dtype=torch.long, device=device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            )
            count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def train_language_model(
    model: torch.nn.Module,
    train: np.ndarray,
    evaluation: np.ndarray,
    settings: dict,
    *,
    eval_bytes: int,
    checkpoint_path=None,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `model` in place on (N, seq_len) chunks for settings["steps"] steps of
    settings["batch_size"] chunks: AdamW (lr, weight_decay on matrices only, betas 0.9/0.95), warm-up
    then cosine decay, gradient clipping at 1. Every eval_every steps (and at the end): held-out
    loss and bits per byte. With checkpoint_path, model, optimizer and history are saved there every
    eval_every steps and a rerun resumes from the last one. Returns the eval history."""
    steps, batch_size = settings["steps"], settings["batch_size"]
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings["lr"], betas=(0.9, 0.95),
    )  # fmt: skip
    start, history = 0, []
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved["settings"] == settings:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            start, history = saved["step"], saved["history"]
            log.info("resuming training from %s at step %d/%d", checkpoint_path, start, steps)
        else:
            log.warning("checkpoint %s has other settings: starting afresh", checkpoint_path)

    def evaluate(step: int, train_loss: float | None) -> None:
        loss = heldout_loss(model, evaluation, batch_size)
        record = {
            "step": step, "tokens": step * batch_size * train.shape[1], "train_loss": train_loss, "eval_loss": loss,
            "eval_bits_per_byte": loss / LN2 * evaluation[:, 1:].size / eval_bytes,
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        history.append(record)
        log.info(
            "step %d/%d: eval loss %.4f nats/token, %.4f bits/byte", step, steps, loss, record["eval_bits_per_byte"]
        )
        if on_eval is not None:
            on_eval(record)

    started = time.perf_counter()
    device = next(model.parameters()).device
    model.train()
    if start == 0:
        evaluate(0, None)
    bar = tqdm(total=steps, initial=start, desc="training", disable=not progress, mininterval=10)
    running = []
    with fast_training(model):
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * cosine_warmup_decay(step, steps, settings["warmup_steps"])
            rows = batch_rows(step, batch_size, len(train), settings["seed"])
            ids = torch.as_tensor(train[rows], dtype=torch.long, device=device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{running[-1]:.3f}", refresh=False)  # the bar redraws every mininterval
            if (step + 1) % settings["eval_every"] == 0 or step + 1 == steps:
                model.eval()
                evaluate(step + 1, float(np.mean(running)))
                model.train()
                running = []
                if checkpoint_path is not None:
                    with atomic_path(checkpoint_path) as tmp:
                        torch.save(
                            {
                                "step": step + 1,
                                "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "settings": settings,
                                "history": history,
                            },
                            tmp,
                        )
    bar.close()
    model.eval()
    return history


def train_configured_model(
    spec: dict, name: str, tokenizer_dir, tokens_path, stats_path, out_dir, history_path
) -> dict:
    """The train_model rule: build the model of spec["source"]["trained"], train it on the tokenizer's
    chunks, save weights + tokenizer under out_dir/weights, the eval history as CSV, and the manifest.
    A checkpoint beside them lets a killed job resume; it is removed once the model is saved."""
    import pandas as pd
    from transformers import AutoTokenizer

    settings = spec["source"]["trained"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with np.load(tokens_path) as tokens:
        train, evaluation = tokens["train"], tokens["eval"]
    stats = json.loads(Path(stats_path).read_text())
    requested = settings["steps"] * settings["batch_size"] * train.shape[1]
    if requested > settings["max_epochs"] * train.size:
        raise ValueError(
            f"models.{name}.source.trained: steps x batch_size x seq_len = {requested} tokens is more than "
            f"max_epochs={settings['max_epochs']} passes over the corpus's {train.size} training tokens; "
            f"lower steps or batch_size, raise max_epochs, or use a larger corpus"
        )
    model = build_model(settings["model_type"], settings.get("config", {}), len(tokenizer), settings["seed"])
    n_parameters = sum(p.numel() for p in model.parameters())
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # the GPU when the job has one
    log.info(
        "model %s: %s with %.2fM parameters, %d steps of %d x %d tokens",
        name,
        settings["model_type"],
        n_parameters / 1e6,
        settings["steps"],
        settings["batch_size"],
        train.shape[1],
    )
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint.pt"
    history = train_language_model(model, train, evaluation, settings, eval_bytes=stats["eval_bytes"],
                                   checkpoint_path=checkpoint)  # fmt: skip
    with atomic_dir(out_dir / "weights") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    with atomic_path(history_path) as tmp:
        pd.DataFrame(history).assign(model=name, unigram_bits_per_byte=stats["unigram_bits_per_byte"]).to_csv(
            tmp, index=False
        )
    manifest = {
        "name": name, "spec": spec, "code_version": CODE_VERSION,
        "resolved": {"parameters": n_parameters, "train_tokens_seen": requested},
        "training": {
            "final_eval_loss": history[-1]["eval_loss"], "final_eval_bits_per_byte": history[-1]["eval_bits_per_byte"],
            "unigram_bits_per_byte": stats["unigram_bits_per_byte"], "tokenizer": stats,
            "seconds": history[-1]["seconds"],
        },
    }  # fmt: skip
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    checkpoint.unlink(missing_ok=True)
    return manifest

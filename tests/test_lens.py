"""Tuned lens and logit lens on tiny models of every family: corpus, lens identities, training,
resumption, saving and evaluation."""

from __future__ import annotations

import gzip
import json
import logging
import math

import numpy as np
import pytest
import torch

from workflow_scripts import lens as lens_module
from workflow_scripts.corpus import count_text_bytes, load_hf_texts, python_reference_texts, read_text_files
from workflow_scripts.lens import (
    INPUT_LAYER,
    TunedLens,
    build_corpus,
    collect_streams,
    evaluate_lenses,
    kl_from_final,
    load_lens,
    logit_lens,
    prediction_trajectory,
    save_lens,
    sequence_length,
    stream_name,
    train_lens,
)

torch.set_num_threads(2)

TINY_SPECS = {
    "llama-tiny": {"family": "transformer", "source": {"tiny": {"model_type": "llama", "seed": 0, "config": {
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 512}}}},
    "mamba-tiny": {"family": "mamba", "source": {"tiny": {"model_type": "mamba", "seed": 0, "config": {
        "hidden_size": 32, "num_hidden_layers": 3, "state_size": 8, "expand": 2}}}},
    # rescale_every=2 with 4 blocks: the eval-mode halving also follows the last block.
    "rwkv-tiny": {"family": "rwkv", "source": {"tiny": {"model_type": "rwkv", "seed": 0, "config": {
        "hidden_size": 32, "num_hidden_layers": 4, "attention_hidden_size": 32, "intermediate_size": 64,
        "context_length": 512, "rescale_every": 2}}}},
}  # fmt: skip
SEQ_LEN = 32


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from workflow_scripts.adapters import load_adapter
    from workflow_scripts.model_sources import materialize

    root = tmp_path_factory.mktemp("lens_models")
    built = {}
    for name, spec in TINY_SPECS.items():
        materialize(spec, name, root / name)
        built[name] = load_adapter(spec, name, root / name / "weights")
    return built


@pytest.fixture(params=sorted(TINY_SPECS))
def adapter(request, adapters):
    return adapters[request.param]


@pytest.fixture(scope="module")
def corpora(adapters):
    """name -> (train, eval) token arrays from the Python reference text (byte tokenizer: same ids
    for every tiny model, but built per model as a pipeline would)."""
    result = {}
    for name, adapter in adapters.items():
        result[name] = build_corpus(
            python_reference_texts(), adapter.encode, SEQ_LEN, n_train_tokens=16 * SEQ_LEN, n_eval_tokens=4 * SEQ_LEN,
            seed=0, eos_token_id=adapter.tokenizer.eos_token_id, source_name="pydoc_data",
        )  # fmt: skip
    return result


# ----- corpus --------------------------------------------------------------------------------------
def numbered_documents(count):
    return [f"doc{i}" for i in range(count)]


def encode_numbered(text):
    """Every token of document i is 1000 + i, so a token says which document it came from."""
    number = int(text[3:])
    return [1000 + number] * (3 + number % 7)


def test_corpus_splits_are_disjoint_shuffled_and_seeded():
    train, evaluation = build_corpus(numbered_documents(300), encode_numbered, 8, 200, 60, seed=1, eos_token_id=0)
    assert train.shape == (25, 8) and evaluation.shape == (8, 8) and train.dtype == np.int32
    train_docs, eval_docs = set(train.ravel()) - {0}, set(evaluation.ravel()) - {0}
    assert train_docs and eval_docs and not train_docs & eval_docs  # no document in both
    assert (train == 0).any()  # the EOS separator is there
    again = build_corpus(numbered_documents(300), encode_numbered, 8, 200, 60, seed=1, eos_token_id=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], evaluation)
    other = build_corpus(numbered_documents(300), encode_numbered, 8, 200, 60, seed=2, eos_token_id=0)
    assert not np.array_equal(other[0], train)
    # Chunks are shuffled: in reading order the document numbers would only grow.
    first_doc_of_chunk = [min(set(row) - {0}, default=0) for row in train]
    assert first_doc_of_chunk != sorted(first_doc_of_chunk)


def test_corpus_errors_name_the_shortfall():
    with pytest.raises(ValueError, match=r"'tiny-source': found \d+ tokens in 5 documents"):
        build_corpus(numbered_documents(5), encode_numbered, 8, 200, 60, 0, eos_token_id=0, source_name="tiny-source")
    with pytest.raises(ValueError, match="no documents"):
        build_corpus([], encode_numbered, 8, 16, 8, seed=0, eos_token_id=0)
    with pytest.raises(ValueError, match="found 0 tokens"):
        build_corpus(["", ""], lambda text: [], 8, 16, 8, seed=0, eos_token_id=0)
    with pytest.raises(ValueError, match="seq_len=1"):
        build_corpus(numbered_documents(5), encode_numbered, 1, 16, 8, seed=0, eos_token_id=0)


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as handle:
        handle.write("second document")
    assert list(read_text_files(str(tmp_path / "*.txt*"))) == ["first document", "second document"]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_text_files(str(tmp_path / "nothing-here*"))
    assert sum(1 for _ in python_reference_texts()) > 50

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(3)))
    cache = str(tmp_path / "hf-cache")
    texts = load_hf_texts("json", "train", "content", data_files=str(rows), cache_dir=cache)
    assert list(texts) == ["row 0", "row 1", "row 2"]
    with pytest.raises(ValueError, match=r"no text column 'text'.*content"):
        load_hf_texts("json", "train", "text", data_files=str(rows), cache_dir=cache)


# ----- lens identities -----------------------------------------------------------------------------
@torch.no_grad()
def test_zero_translators_are_the_logit_lens_and_last_layer_is_the_model(adapter, corpora):
    train, _ = corpora[adapter.info["name"]]
    token_ids = torch.as_tensor(train[:2], dtype=torch.long)
    streams, logits = collect_streams(adapter, token_ids, include_input=True)
    lens = TunedLens(adapter, include_input=True)
    size = adapter.hidden_size
    assert sum(p.numel() for p in lens.parameters()) == len(lens.layers) * (size + 1) * size  # no model weights
    for layer in lens.streams:
        assert torch.equal(lens(streams[layer], layer), logit_lens(adapter, streams[layer]))
    # What block 0 receives is the token embedding, for every family.
    torch.testing.assert_close(streams[INPUT_LAYER], adapter.model.get_input_embeddings()(token_ids), rtol=0, atol=0)
    # The last block's output through the output head is the model's own prediction.
    last = logit_lens(adapter, streams[adapter.n_layers - 1])
    torch.testing.assert_close(last, logits, rtol=0, atol=1e-5)
    assert kl_from_final(logits.log_softmax(-1), last).item() < 1e-6
    assert kl_from_final(logits.log_softmax(-1), logit_lens(adapter, streams[0])).item() > 1e-4


def decode_by_hand(adapter, hidden):
    """The model's own output head, found by name per family here (not through the adapter): final
    norm, then unembedding. RWKV in eval mode halves its stream after every rescale_every blocks
    before the final norm, so a stream in training units is halved as many times first."""
    model, config = adapter.model, adapter.model.config
    if adapter.family == "rwkv":
        halvings = sum((block + 1) % config.rescale_every == 0 for block in range(config.num_hidden_layers))
        return model.head(model.rwkv.ln_out(hidden / 2**halvings))
    norm = model.backbone.norm_f if adapter.family == "mamba" else model.model.norm
    return model.lm_head(norm(hidden))


@torch.no_grad()
def test_default_lens_reads_the_embeddings_like_the_tuned_lens_package(adapter, corpora):
    n = adapter.n_layers
    lens = TunedLens(adapter)  # as the train_tuned_lens rule builds it
    assert lens.streams == [INPUT_LAYER, *range(n)]
    assert lens.layers == [INPUT_LAYER, *range(n - 1)]  # the package's translators: embeddings, blocks 0..n-2
    assert [stream_name(layer, n) for layer in (INPUT_LAYER, 0, n - 1)] == [
        "embeddings", "block 0", f"block {n - 1} (model output)"]  # fmt: skip

    _, evaluation = corpora[adapter.info["name"]]
    token_ids = torch.as_tensor(evaluation[:2], dtype=torch.long)
    streams, _ = collect_streams(adapter, token_ids)
    # Zero translators on the embedding stream = the model's final norm and unembedding applied by
    # hand to its input embeddings.
    expected = decode_by_hand(adapter, adapter.model.get_input_embeddings()(token_ids))
    torch.testing.assert_close(lens(streams[INPUT_LAYER], INPUT_LAYER), expected, rtol=1e-5, atol=1e-5)

    # The evaluation table has that stream, labelled, at depth 0, with the CE of those logits.
    frame = evaluate_lenses(adapter, evaluation[:2], lens, batch_size=2)
    rows = frame[frame.stream == "embeddings"].set_index("lens")
    assert sorted(rows.index) == ["logit", "tuned"] and set(rows.layer) == {INPUT_LAYER} and set(rows.depth) == {0.0}
    targets = token_ids[:, 1:].flatten()
    ce_by_hand = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1).double(), targets).item()
    np.testing.assert_allclose(rows.ce_nats.to_numpy(), ce_by_hand, rtol=1e-5)
    assert set(frame.stream) == {stream_name(layer, n) for layer in lens.streams}


def test_figures_label_the_embeddings(adapters, corpora, monkeypatch):
    from workflow_scripts import figures

    drawn = []
    monkeypatch.setattr(figures, "save", lambda figure, path: drawn.append(figure))
    adapter = adapters["llama-tiny"]
    n = adapter.n_layers
    trajectory = prediction_trajectory(adapter, adapter.encode("The cat sat."), TunedLens(adapter))
    figures.plot_trajectory(trajectory.assign(model="llama-tiny"), "trajectory.png")
    for axis in drawn[0].axes[:2]:  # logit and tuned heatmaps, rows from the last block down
        labels = [label.get_text() for label in axis.get_yticklabels()]
        assert labels == [stream_name(layer, n) for layer in reversed(range(-1, n))]
        assert labels[-1] == "embeddings"

    _, evaluation = corpora["llama-tiny"]
    frame = evaluate_lenses(adapter, evaluation[:2], TunedLens(adapter), batch_size=2, model_name="llama-tiny")
    figures.plot_lens_depth(frame, {"logit": "logit.png", "tuned": "tuned.png"})
    for figure in drawn[1:]:
        assert "embeddings" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_sequence_length_follows_the_tokenizer_limit_as_the_package_does():
    assert sequence_length(2048, 1024) == 1024
    assert sequence_length(2048, int(1e30)) == 2048  # transformers' "no limit" sentinel
    assert sequence_length(64, None) == 64


PAPER_LENS_HUB_PREFIXES = ("state-spaces/mamba-", "RWKV/rwkv-4-", "EleutherAI/pythia-")  # PAPER.md section 2


def test_paper_config_has_the_paper_lens_settings():
    import copy
    import re
    from pathlib import Path

    import yaml

    from workflow_scripts.configuration import ConfigError, check_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/paper.yaml").read_text())
    config = check_config(raw)
    lens = config["lens"]
    source = lens["corpus"]["source"]["hf_dataset"]
    assert "pile" in source["name"].lower() and source["split"] == "validation"
    assert re.fullmatch(r"[0-9a-f]{40}", source["revision"])
    assert lens["corpus"]["seq_len"] == 2048
    training = lens["training"]
    assert (training["steps"], training["tokens_per_step"]) == (250, 2**18)
    assert lens["corpus"]["train_tokens"] >= 250 * 2**18  # enough text that no sequence is trained on twice
    assert (training["lr_scale"], training["momentum"], training["weight_decay"]) == (1.0, 0.9, 1e-3)
    assert (training["warmup_steps"], training["max_grad_norm"]) == (0, 1.0)
    assert lens["corpus"]["eval_tokens"] == 61 * 8 * 2048  # what the authors' result files scored
    # The paper's base models of the three families, and no chat model.
    hub_ids = [config["models"][name]["source"]["hub"]["id"] for name in lens["models"]]
    assert all(hub_id.startswith(PAPER_LENS_HUB_PREFIXES) for hub_id in hub_ids)
    assert {prefix for prefix in PAPER_LENS_HUB_PREFIXES if any(i.startswith(prefix) for i in hub_ids)} == set(
        PAPER_LENS_HUB_PREFIXES)  # fmt: skip

    unpinned = copy.deepcopy(raw)
    unpinned["lens"]["corpus"]["source"]["hf_dataset"]["revision"] = "main"
    with pytest.raises(ConfigError, match="revision"):
        check_config(unpinned)


# ----- training ------------------------------------------------------------------------------------
def mean_kl(frame, lens_name):
    rows = frame[(frame.lens == lens_name) & (frame.layer < frame.layer.max())]
    return rows.kl_nats.mean()


def test_training_reduces_kl_and_keeps_the_model_frozen(adapter, corpora):
    train, evaluation = corpora[adapter.info["name"]]
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    flags = {name: p.requires_grad for name, p in adapter.model.named_parameters()}
    lens = TunedLens(adapter)
    history = train_lens(adapter, lens, train, steps=8, tokens_per_step=4 * SEQ_LEN, batch_size=2, progress=False)
    assert [record["step"] for record in history] == list(range(1, 9))
    assert history[-1]["lr"] == pytest.approx(0.1 / 8)  # linear decay: the last step uses 1/steps of lr
    # The embeddings are trained like every other stream (one KL term each); the last block is not.
    assert len(history[-1]["kl_per_layer"]) == adapter.n_layers and history[0]["kl_per_layer"][0] > 0
    assert lens.translators[lens.index_of(INPUT_LAYER)].weight.abs().sum() > 0
    frame = evaluate_lenses(adapter, evaluation, lens, batch_size=2)
    # Held-out KL, same tokens for both lenses (per-step training losses differ by batch).
    assert mean_kl(frame, "tuned") < mean_kl(frame, "logit")
    for name, parameter in adapter.model.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.grad is None
        assert parameter.requires_grad == flags[name]


class SimulatedKill(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(adapters, corpora, tmp_path, caplog):
    adapter = adapters["mamba-tiny"]
    train, _ = corpora["mamba-tiny"]
    settings = dict(steps=6, tokens_per_step=2 * SEQ_LEN, batch_size=1, checkpoint_every=2, progress=False)

    whole = TunedLens(adapter)
    whole_history = train_lens(adapter, whole, train, **settings)

    def kill_after_step_5(record):
        if record["step"] == 5:
            raise SimulatedKill  # after step 5's update; the last checkpoint is from step 4

    checkpoint = tmp_path / "lens.ckpt"
    killed = TunedLens(adapter)
    with pytest.raises(SimulatedKill):
        train_lens(adapter, killed, train, checkpoint_path=checkpoint, on_step=kill_after_step_5, **settings)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4

    resumed = TunedLens(adapter)  # a fresh process: nothing but the checkpoint survives
    with caplog.at_level(logging.INFO, logger="workflow_scripts.lens"):
        history = train_lens(adapter, resumed, train, checkpoint_path=checkpoint, **settings)
    assert "at step 4/6" in caplog.text
    assert [record["step"] for record in history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in history] == [r["loss"] for r in whole_history]
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name

    with pytest.raises(ValueError, match="lr_scale"):
        train_lens(adapter, TunedLens(adapter), train, checkpoint_path=checkpoint, lr_scale=0.5, **settings)
    with pytest.raises(ValueError, match="tokens_per_step=40"):
        train_lens(adapter, TunedLens(adapter), train, steps=1, tokens_per_step=40, progress=False)


def test_save_and_load(adapters, corpora, tmp_path):
    adapter = adapters["llama-tiny"]
    train, _ = corpora["llama-tiny"]
    lens = TunedLens(adapter, include_input=True)
    train_lens(adapter, lens, train, steps=2, tokens_per_step=2 * SEQ_LEN, progress=False)
    path = tmp_path / "lens.safetensors"
    save_lens(lens, path, extra={"corpus": "pydoc_data"})
    settings = json.loads(path.with_suffix(".json").read_text())
    # Three blocks: translators for the embeddings and blocks 0, 1; block 2's output is the model's.
    assert settings["corpus"] == "pydoc_data" and settings["steps"] == 2 and settings["layers"] == [-1, 0, 1]
    loaded = load_lens(adapter, path)
    hidden = torch.randn(3, adapter.hidden_size)
    for layer in lens.streams:
        assert torch.equal(loaded(hidden, layer), lens(hidden, layer))
    with pytest.raises(ValueError, match="n_layers=3"):
        load_lens(adapters["rwkv-tiny"], path)
    # A lens written with a translator for the last block too (before this layout) is refused by name.
    path.with_suffix(".json").write_text(json.dumps({**settings, "layers": [-1, 0, 1, 2]}))
    with pytest.raises(ValueError, match="train it again"):
        load_lens(adapter, path)


# ----- evaluation ----------------------------------------------------------------------------------
def test_evaluation_table(adapters, corpora):
    adapter = adapters["rwkv-tiny"]
    _, evaluation = corpora["rwkv-tiny"]
    frame = evaluate_lenses(adapter, evaluation, TunedLens(adapter, include_input=True), batch_size=3)
    assert len(frame) == 2 * (adapter.n_layers + 1)
    expected_columns = {"model", "lens", "layer", "depth", "ce_nats", "kl_nats", "entropy_nats", "ce_bits_per_byte"}
    assert expected_columns <= set(frame.columns)
    assert frame.model.unique().tolist() == ["rwkv-tiny"]
    # Untrained tuned lens = logit lens; the last layer is the model itself.
    logit, tuned = (frame[frame.lens == name].set_index("layer") for name in ("logit", "tuned"))
    np.testing.assert_allclose(tuned.ce_nats, logit.ce_nats)
    assert abs(logit.kl_nats[adapter.n_layers - 1]) < 1e-6 and logit.depth[INPUT_LAYER] == 0.0
    # Byte tokenizer on ASCII text: one byte per scored token except the EOS separators.
    scored = evaluation[:, 1:]
    n_bytes = int((scored != adapter.tokenizer.eos_token_id).sum())
    assert frame.n_bytes.iloc[0] == n_bytes and frame.n_tokens.iloc[0] == scored.size
    expected = logit.ce_nats / math.log(2) * scored.size / n_bytes
    np.testing.assert_allclose(logit.ce_bits_per_byte, expected)
    assert count_text_bytes(evaluation, lambda ids: adapter.tokenizer.decode(ids, skip_special_tokens=True)) == n_bytes


def test_prediction_trajectory(adapters):
    adapter = adapters["llama-tiny"]
    tokens = adapter.encode("The cat sat on the mat.")
    frame = prediction_trajectory(adapter, tokens, TunedLens(adapter))
    assert len(frame) == 2 * (adapter.n_layers + 1) * (len(tokens) - 1)  # the embeddings are a row too
    assert set(frame.columns) >= {"lens", "layer", "stream", "position", "input_token", "top1_token", "ce_nats"}
    assert set(frame[frame.layer == INPUT_LAYER].stream) == {"embeddings"}


def test_lens_module_has_no_architecture_names():
    source = open(lens_module.__file__).read().lower()
    for name in ("mamba", "rwkv", "llama", "pythia", "gpt_neox"):
        assert name not in source


def test_evaluation_kl_is_the_training_kl(adapters, corpora):
    """The evaluation computes KL from the log-probabilities it already has (for CE and entropy);
    training uses kl_from_final's fused cross-entropy. Both must give the same number per stream."""
    adapter = adapters["mamba-tiny"]
    _, evaluation = corpora["mamba-tiny"]
    lens = TunedLens(adapter)
    with torch.no_grad():
        for translator in lens.translators:  # a lens that is not the logit lens
            translator.weight.normal_(0, 0.05)
    frame = evaluate_lenses(adapter, evaluation[:2], lens, batch_size=2)
    tokens = torch.as_tensor(evaluation[:2], dtype=torch.long)
    streams, logits = collect_streams(adapter, tokens, include_input=True)
    final = logits[:, :-1].float().log_softmax(-1)
    for layer in (INPUT_LAYER, 0, adapter.n_layers - 2):
        with torch.no_grad():
            expected = kl_from_final(final, lens(streams[layer][:, :-1], layer)).item()
        got = frame[(frame.lens == "tuned") & (frame.layer == layer)].kl_nats.item()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)

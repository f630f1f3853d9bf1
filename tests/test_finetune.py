"""Quirky fine-tuning on the tiny models of every family: the loss is the answer token's, training
lowers the validation loss, the best checkpoint is the one saved, and it loads back as a local model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import REPO, TINY_MODELS
from workflow_scripts import finetune, quirky_answers, quirky_data
from workflow_scripts.adapters import load_adapter
from workflow_scripts.configuration import ConfigError, check_config
from workflow_scripts.finetune import FinetuneSettings, balanced_sample, finetune_quirky
from workflow_scripts.quirky_answers import (
    accuracy_table,
    answer_loss,
    answer_probabilities,
    answer_tokens,
    encode_prompts,
)
from workflow_scripts.quirky_data import generate_quirky

FAMILIES = {spec["family"]: name for name, spec in TINY_MODELS.items()}
# Tiny runs: byte-level tokenizers (" True" is 5 tokens), so the shared leading space joins the prompt.
# peft refuses LoRA on the Mamba mixer's out_proj (its fused kernel reads the weight directly).
MAMBA_LORA = ["in_proj", "x_proj", "dt_proj"]
FAST = dict(effective_batch=16, micro_batch=8, max_steps=12, eval_every=4, allow_shared_prefix=True)


def run(adapter, quirky, out_dir, **settings):
    """finetune_quirky with the FAST settings, changed by `settings`, and no progress bar."""
    return finetune_quirky(adapter, *quirky, out_dir, FinetuneSettings(**{**FAST, **settings}), progress=False)


@pytest.fixture(scope="module")
def quirky():
    frame = generate_quirky("addition", 48, seed=0)
    return frame[frame.split == "train"], frame[frame.split == "validation"]


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reload(out_dir, adapter):
    spec = {"family": adapter.family, "source": {"local": {"path": str(out_dir)}}, "n_layers": adapter.n_layers}
    return load_adapter(spec, f"{adapter.info['name']}-quirky")


def val_loss_of(adapter, val):
    """The answer-token loss of a model on the balanced validation rows, as finetune computes it."""
    answer = answer_tokens(adapter, allow_shared_prefix=True)
    rows = balanced_sample(val, None, seed=1)
    with torch.no_grad():
        batch = adapter.batch(encode_prompts(adapter, rows["statement"], answer))
        return float(answer_loss(adapter, batch, answer.targets(rows["label"]))), batch


def check_reloads(summary, out_dir, adapter, val):
    """The saved directory loads through a local source (weights and tokenizer) and computes what the
    fine-tuned model in memory computes; its validation loss is the best step's."""
    tuned, loaded = summary["adapter"], reload(out_dir, adapter)
    assert loaded.tokenizer.get_vocab() == adapter.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == adapter.tokenizer.chat_template
    statement = val["statement"].iloc[0]
    assert loaded.encode(statement) == adapter.encode(statement)
    loss_loaded, batch = val_loss_of(loaded, val)
    loss_tuned, _ = val_loss_of(tuned, val)
    with torch.no_grad():
        logits_loaded = loaded.forward(batch.input_ids, batch.attention_mask)[0]
        logits_tuned = tuned.forward(batch.input_ids, batch.attention_mask)[0]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits_loaded[real], logits_tuned[real], rtol=0, atol=1e-5)
    assert loss_loaded == pytest.approx(summary["best_val_loss"], abs=1e-4)
    p = answer_probabilities(loaded, val, batch_size=8, allow_shared_prefix=True)
    assert p.shape == (len(val),) and ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p, answer_probabilities(tuned, val, batch_size=5, allow_shared_prefix=True), atol=1e-5)
    on_disk = json.loads((out_dir / "finetune.json").read_text())
    assert on_disk["best_step"] == summary["best_step"] and on_disk["history"] == summary["history"]


# ----- the loss ----------------------------------------------------------------------------------


def test_loss_is_the_answer_tokens_cross_entropy_only(tiny_adapter, quirky):
    adapter = tiny_adapter
    answer = answer_tokens(adapter, allow_shared_prefix=True)
    rows = quirky[0].iloc[[0, 1, 5, 9]]
    prompts = encode_prompts(adapter, rows["statement"], answer)
    assert len(set(map(len, prompts))) > 1  # the batch is padded
    targets = answer.targets(rows["label"])
    batch = adapter.batch(prompts)
    with torch.no_grad():
        loss = answer_loss(adapter, batch, targets)
        # By hand: each row alone, unpadded, cross-entropy of its target at its last token only.
        by_hand = [
            F.cross_entropy(adapter.forward(torch.tensor([tokens]))[0][0, -1].float(), target)
            for tokens, target in zip(prompts, targets)
        ]
        assert float(loss) == pytest.approx(float(torch.stack(by_hand).mean()), abs=1e-5)
        # What the padding holds cannot matter.
        padded = batch.input_ids.clone()
        padded[batch.attention_mask == 0] = answer.true_id
        repadded = type(batch)(padded, batch.attention_mask, batch.lengths)
        assert float(answer_loss(adapter, repadded, targets)) == pytest.approx(float(loss), abs=1e-5)


def test_answer_tokens_must_be_single_tokens(tiny_adapters):
    adapter = tiny_adapters[FAMILIES["transformer"]]
    with pytest.raises(ValueError, match="single token"):
        answer_tokens(adapter)  # byte-level: " True" is five tokens
    answer = answer_tokens(adapter, allow_shared_prefix=True)
    assert answer.prefix_ids == tuple(adapter.encode(" "))
    assert (answer.true_id, answer.false_id) == (adapter.encode("T")[0], adapter.encode("F")[0])

    class WordTokens:  # a tokenizer where the answers are one token each
        info = {"name": "words"}
        vocab = {" True": 7, " False": 8}

        def encode(self, text):
            return [self.vocab[text]]

    answer = answer_tokens(WordTokens())
    assert (answer.true_id, answer.false_id, answer.prefix_ids) == (7, 8, ())
    assert answer.targets([1, 0, 1]).tolist() == [7, 8, 7]


def test_balanced_sample_balances_character_and_label():
    frame = pd.DataFrame(
        {
            "statement": [f"s{i}" for i in range(12)],
            "character": ["Alice"] * 8 + ["Bob"] * 4,
            "label": [1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0],
        }
    )
    sample = balanced_sample(frame, seed=0)
    assert sample.groupby(["character", "label"]).size().tolist() == [2, 2, 2, 2]
    assert len(balanced_sample(frame, max_examples=5)) == 4  # one per (character, label) cell
    with pytest.raises(ValueError, match="no rows with label 0"):
        balanced_sample(frame[frame.label == 1])


def test_accuracy_table_by_character_and_difficulty():
    frame = pd.DataFrame(
        {
            "character": ["Alice"] * 4 + ["Bob"] * 4,
            "difficulty_bucket": ["easy", "easy", "hard", "hard"] * 2,
            "label": [1, 0, 1, 0, 0, 1, 1, 0],
            "truth_label": [1, 0, 1, 0, 1, 0, 1, 0],
        }
    )
    p_true = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.8, 0.7, 0.4])  # Alice: one hard row wrong
    table = accuracy_table(frame, p_true).set_index(["character", "difficulty"])
    assert table.loc[("Alice", "all"), ["n", "accuracy"]].tolist() == [4, 0.75]
    assert table.loc[("Alice", "easy"), "accuracy"] == 1.0 and table.loc[("Alice", "hard"), "accuracy"] == 0.5
    assert table.loc[("Bob", "all"), "accuracy"] == 1.0 and table.loc[("Bob", "all"), "truth_accuracy"] == 0.5
    # Wilson 95% interval of 3 right out of 4.
    lo, hi = table.loc[("Alice", "all"), ["accuracy_lo", "accuracy_hi"]]
    assert lo == pytest.approx(0.3006, abs=1e-4) and hi == pytest.approx(0.9544, abs=1e-4)
    assert list(table.index.get_level_values("difficulty")[:3]) == ["all", "easy", "hard"]
    # Threshold-free scores: Alice's p_true ranks her true claims 0.9, 0.2 against false 0.1, 0.3 (3 of
    # 4 pairs right); Bob's ranks his own labels perfectly, and against the truth 1 of 4 pairs.
    assert table.loc[("Alice", "all"), "auroc"] == pytest.approx(0.75)
    assert table.loc[("Bob", "all"), ["auroc", "truth_auroc"]].tolist() == pytest.approx([1.0, 0.25])
    assert table.loc[("Alice", "all"), "balanced_accuracy"] == pytest.approx(0.75)


def test_balanced_accuracy_does_not_reward_always_false():
    """A quarter of the claims are true: answering False everywhere is 0.75 accurate, 0.5 balanced."""
    frame = pd.DataFrame({"character": ["Alice"] * 8, "difficulty_bucket": ["easy"] * 8,
                          "label": [1, 1, 0, 0, 0, 0, 0, 0], "truth_label": [1, 1, 0, 0, 0, 0, 0, 0]})  # fmt: skip
    row = accuracy_table(frame, np.full(8, 0.1)).iloc[0]
    assert row["accuracy"] == 0.75 and row["balanced_accuracy"] == 0.5 and row["auroc"] == 0.5


@pytest.mark.parametrize(
    "setting, value",
    [
        ("method", "qlora"),
        ("lr", 0.0),
        ("warmup_fraction", 1.5),
        ("warmup_fraction", 1.0),  # warm-up over every step would leave no decay
        ("lora_rank", 0),
        ("lora_modules", "mlp"),
        ("max_steps", 0),
        ("betas", [0.9, 1.2]),
        ("effective_batch", 0),
        ("max_grad_norm", 0),
    ],
)
def test_the_config_schema_refuses_a_bad_setting_naming_it(setting, value):
    """Each setting's own range is the config schema's to check, before any job runs."""
    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["quirky"]["finetune"][setting] = value
    with pytest.raises(ConfigError, match=rf"quirky\.finetune\.{setting}"):
        check_config(config)


def test_the_schema_defaults_are_the_settings_defaults():
    """Every key the schema allows under quirky.finetune is a FinetuneSettings field (the rule passes
    them all), with the same default."""
    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["quirky"]["finetune"] = {}
    defaults = check_config(config)["quirky"]["finetune"]
    assert FinetuneSettings(**defaults) == FinetuneSettings()
    for key, value in defaults.items():
        assert getattr(FinetuneSettings(), key) == (tuple(value) if isinstance(value, list) else value), key


def test_settings_across_fields_are_refused_naming_them():
    with pytest.raises(ValueError, match="effective_batch=30: must be a multiple of micro_batch=8"):
        FinetuneSettings(**dict(FAST, effective_batch=30))
    with pytest.raises(ValueError, match=r"max_steps=12: give epochs or max_steps, not both \(epochs=1\)"):
        FinetuneSettings(**FAST, epochs=1)
    with pytest.raises(TypeError, match="FinetuneSettings"):
        finetune_quirky(None, None, None, "out", dict(FAST))


# ----- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_runs(tiny_adapters, quirky, tmp_path_factory):
    """Full fine-tuning of every family's tiny model: name -> (summary, out_dir, weights before)."""
    runs = {}
    for name, adapter in tiny_adapters.items():
        before = params(adapter.model)
        out_dir = tmp_path_factory.mktemp("full") / name
        summary = run(adapter, quirky, out_dir, method="full", lr=3e-3)
        runs[name] = (summary, out_dir, before)
    return runs


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_full_finetuning_lowers_validation_loss_and_reloads(full_runs, tiny_adapters, quirky, name):
    summary, out_dir, before = full_runs[name]
    adapter = tiny_adapters[name]
    history = summary["history"]
    assert [entry["step"] for entry in history] == [0, 4, 8, 12]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert {"train_loss", "val_loss", "alice_acc", "bob_acc"} <= set(history[-1])
    losses = [entry["val_loss"] for entry in history]
    assert summary["best_step"] == history[int(np.argmin(losses))]["step"]
    assert summary["trainable_parameters"] == summary["total_parameters"]
    # The adapter's own model is untouched (training works on a copy).
    for param_name, value in params(adapter.model).items():
        assert torch.equal(value, before[param_name]), param_name
    assert not any(p.requires_grad for p in adapter.model.parameters())
    check_reloads(summary, out_dir, adapter, quirky[1])


@pytest.fixture(scope="module")
def lora_runs(tiny_adapters, quirky, tmp_path_factory):
    """LoRA on every family (RWKV's eval mode rescales weights in place), watching the model at every
    evaluation: name -> (summary, out_dir, what was seen)."""
    runs = {}
    real_evaluate = finetune._evaluate
    for family in ("transformer", "rwkv", "mamba"):
        name = FAMILIES[family]
        seen = []

        def spy(view, *args, **kwargs):
            named = dict(view.model.named_parameters())
            seen.append(
                {
                    "trainable": sorted(n for n, p in named.items() if p.requires_grad),
                    "base": {n: p.detach().clone() for n, p in named.items() if "lora_" not in n},
                    "lora": {n: p.detach().clone() for n, p in named.items() if "lora_" in n},
                }
            )
            return real_evaluate(view, *args, **kwargs)

        out_dir = tmp_path_factory.mktemp("lora") / name
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(finetune, "_evaluate", spy)
            summary = run(
                tiny_adapters[name], quirky, out_dir, method="lora", lr=1e-2, lora_rank=4,
                lora_target_modules=MAMBA_LORA if family == "mamba" else None,
            )  # fmt: skip
        runs[name] = (summary, out_dir, seen)
    return runs


@pytest.mark.parametrize("family", ["transformer", "rwkv", "mamba"])
def test_lora_trains_only_lora_and_reloads_merged(lora_runs, tiny_adapters, quirky, family):
    name = FAMILIES[family]
    summary, out_dir, seen = lora_runs[name]
    adapter = tiny_adapters[name]
    history = summary["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    targets = MAMBA_LORA if family == "mamba" else adapter.lora_target_modules()
    assert summary["settings"]["lora_target_modules"] == targets
    assert summary["trainable_parameters"] < summary["total_parameters"]
    # The Mamba port computes dt_proj from its weight directly (dt_proj.weight @ x), past the LoRA branch.
    assert summary["lora_unreached_modules"] == (["dt_proj"] if family == "mamba" else [])
    for watched in seen:
        assert watched["trainable"] and all("lora_" in n for n in watched["trainable"])
        # The base weights stay as they were before merging; only the LoRA weights move.
        for param_name, value in watched["base"].items():
            assert torch.equal(value, seen[0]["base"][param_name]), param_name
    assert any(not torch.equal(value, seen[0]["lora"][n]) for n, value in seen[-1]["lora"].items())
    if family != "rwkv":  # the base weights are the adapter's own (RWKV's may be rescaled in place)
        original = dict(adapter.model.named_parameters())
        for param_name, value in seen[-1]["base"].items():
            key = param_name.replace(".base_layer", "")
            assert torch.equal(value, original[key]), param_name
    # Merged: a plain model (no LoRA names) that computes what the fine-tuned model does.
    assert not any("lora" in n for n, _ in reload(out_dir, adapter).model.named_parameters())
    check_reloads(summary, out_dir, adapter, quirky[1])


@pytest.mark.parametrize("family", ["transformer", "rwkv", "mamba"])
@torch.no_grad()
def test_saved_lora_adapter_on_the_base_model_is_the_merged_model(lora_runs, tiny_model_dirs, family):
    """The adapter saved beside the merged weights, loaded with peft onto the base model as saved by
    build_model, computes the merged model's logits; only LoRA weights are in it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = FAMILIES[family]
    _, out_dir, _ = lora_runs[name]
    lora_dir = out_dir / finetune.LORA_DIR
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in lora_dir.iterdir()}
    from safetensors.torch import load_file

    saved = load_file(str(lora_dir / "adapter_model.safetensors"))
    assert saved and all("lora_A" in key or "lora_B" in key for key in saved)
    token_ids = torch.tensor([[5, 9, 17, 33, 2, 64, 7, 11]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs / name / "weights", dtype=torch.float32).eval()
    if family == "rwkv":  # eval mode would rescale the base weights in place, not the LoRA branch beside them
        base.config.rescale_every = 0
    base_logits = base(input_ids=token_ids).logits
    with_lora = PeftModel.from_pretrained(base, lora_dir).eval()  # injects the LoRA layers into `base`
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ours, theirs = with_lora(input_ids=token_ids).logits, merged(input_ids=token_ids).logits
    assert not torch.allclose(base_logits, theirs, atol=1e-4)  # the fine-tuning changed the model
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_best_checkpoint_by_validation_loss_is_saved(tiny_adapters, quirky, tmp_path, monkeypatch):
    """Scripted validation losses put the best step in the middle: the weights saved are that step's."""
    adapter = tiny_adapters[FAMILIES["transformer"]]
    scripted = iter([5.0, 3.0, 1.0, 2.0, 4.0])  # steps 0, 2, 4, 6, 8
    weights = []

    def fake_evaluate(view, *args, **kwargs):
        weights.append(params(view.model))
        return {"val_loss": next(scripted), "val_acc": 0.5, "alice_acc": 0.5, "bob_acc": 0.5}

    monkeypatch.setattr(finetune, "_evaluate", fake_evaluate)
    summary = run(adapter, quirky, tmp_path / "out", method="full", lr=1e-2, max_steps=8, eval_every=2)
    assert [entry["step"] for entry in summary["history"]] == [0, 2, 4, 6, 8]
    assert summary["best_step"] == 4 and summary["best_val_loss"] == 1.0
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["best_step"] == 4
    saved = params(reload(tmp_path / "out", adapter).model)
    for param_name, value in saved.items():
        assert torch.equal(value, weights[2][param_name]), param_name
    assert any(not torch.equal(value, weights[-1][n]) for n, value in saved.items())


def test_max_grad_norm_clips_every_step_before_the_optimizer_steps(tiny_adapters, quirky, tmp_path, monkeypatch):
    """With max_grad_norm (configs/paper.yaml: 1.0, as the reference's Trainer), each step's gradient
    reaches the optimizer with norm at most that value; without it, no step is clipped."""
    adapter = tiny_adapters[FAMILIES["transformer"]]
    seen = []
    original_step = torch.optim.AdamW.step

    def observed_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))))
        return original_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", observed_step)
    run(adapter, quirky, tmp_path / "clipped", method="full", lr=1e-2, max_steps=4, eval_every=4, max_grad_norm=1e-3)
    assert len(seen) == 4 and max(seen) <= 1e-3 * (1 + 1e-4), seen
    seen.clear()
    run(adapter, quirky, tmp_path / "free", method="full", lr=1e-2, max_steps=4, eval_every=4)
    assert len(seen) == 4 and min(seen) > 1e-3, seen  # the same model's gradients are far above the clip


def test_finetuning_prompts_are_the_extracted_prompts_with_special_tokens(tiny_adapter, quirky):
    """The model is fine-tuned on the same token ids that extraction (and the probes) read: with a
    tokenizer that puts a BOS first (as Llama's), both carry it once."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from workflow_scripts.prompts import PromptItem, tokenize_prompts

    adapter = copy.copy(tiny_adapter)
    adapter.tokenizer = copy.deepcopy(tiny_adapter.tokenizer)
    bos = adapter.tokenizer.convert_tokens_to_ids("<|system|>")
    adapter.tokenizer.bos_token = "<|system|>"
    adapter.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos)]
    )
    statements = quirky[0]["statement"].tolist()[:4]
    answer = quirky_answers.answer_tokens(adapter, quirky_data.ANSWERS, allow_shared_prefix=True)
    tuned = quirky_answers.encode_prompts(adapter, statements, answer)
    items = [PromptItem(index=i, id=str(i), prompt=text, completion="") for i, text in enumerate(statements)]
    assert tuned == [ids + list(answer.prefix_ids) for ids in tokenize_prompts(adapter, items, "plain")]
    assert all(ids[0] == bos and ids[1] != bos for ids in tuned)


def test_with_model_wraps_another_model_as_it_is(tiny_adapter):
    """The adapter over a training copy: same family and tokenizer, blocks of the copy, nothing frozen;
    the adapter itself is unchanged."""
    copy_model, _ = tiny_adapter.training_copy()
    copy_model.requires_grad_(True).train()
    view = tiny_adapter.with_model(copy_model)
    assert type(view) is type(tiny_adapter) and view.tokenizer is tiny_adapter.tokenizer
    assert view.model is copy_model and view.info == tiny_adapter.info
    assert {id(b) for b in view.blocks} <= {id(m) for m in copy_model.modules()}
    assert copy_model.training and all(p.requires_grad for p in copy_model.parameters())
    assert tiny_adapter.model is not copy_model and not any(p.requires_grad for p in tiny_adapter.model.parameters())
    renamed = tiny_adapter.with_model(copy_model, info={"name": "other"})
    assert renamed.info == {"name": "other"} and tiny_adapter.info["name"] != "other"


def test_only_dequantized_gguf_marks_are_dropped():
    from types import SimpleNamespace

    from workflow_scripts.model_sources import drop_dequantized_gguf_marks

    model = torch.nn.Linear(2, 2)
    drop_dequantized_gguf_marks(model)  # unmarked: nothing to do
    removed = []
    model.hf_quantizer = SimpleNamespace(
        quantization_config=SimpleNamespace(quant_method="gguf"), remove_quantization_config=removed.append
    )
    drop_dequantized_gguf_marks(model)
    assert removed == [model]
    model.hf_quantizer.quantization_config.quant_method = "bitsandbytes"
    with pytest.raises(ValueError, match="'bitsandbytes'"):
        drop_dequantized_gguf_marks(model)

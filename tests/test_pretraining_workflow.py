"""The matched-models workflow at test size: tokenizer, three trained families (and the transformer's
two SAE baselines), their training curves, the lenses on the RNNs, steering without instructions, quirky
probes on the Mamba (fine-tuned in full) and the SAE feature comparison, through Snakemake."""

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import new_checkout, snakemake

pytestmark = pytest.mark.workflow


def test_trained_models_are_models_like_any_other(tmp_path_factory):
    project = new_checkout(tmp_path_factory)
    result = snakemake(project, "--configfile", "configs/matched-test.yaml", timeout=1800)  # ~10 min on a busy machine
    assert result.returncode == 0, result.stderr[-3000:]
    curves = pd.read_csv(project / "reports/tables/pretraining/training.csv")
    trio = {"llama-trained", "mamba-trained", "rwkv-trained"}
    assert set(curves.model) == trio | {"llama-trained-seed1", "llama-random"}
    for model, rows in curves.groupby("model"):
        rows = rows.sort_values("step")
        manifest = json.loads((project / f"data/models/{model}/manifest.json").read_text())
        assert manifest["training"]["final_eval_loss"] == pytest.approx(rows.eval_loss.iloc[-1], abs=1e-4)
        if model == "llama-random":  # steps: 0, the seeded initialisation evaluated and saved
            assert rows.step.tolist() == [0]
            continue
        assert rows.eval_loss.iloc[-1] < rows.eval_loss.iloc[0] - 0.5, model  # each learned
        assert rows.tokens.iloc[-1] == 40 * 8 * 32  # the same budget for every family
    lens = pd.read_csv(project / "reports/tables/lens/ce_by_layer.csv")
    assert set(lens.model) == {"mamba-trained", "rwkv-trained"}  # every stage runs on them unchanged
    check_sae_outputs(project)
    assert (project / "reports/figures/pretraining/training_curves.png").stat().st_size > 0
    stats = json.loads((project / "data/tokenizers/docs-bpe/stats.json").read_text())
    assert stats["vocab_size"] == 512 and stats["train_documents"] > stats["eval_documents"] > 0
    # Steering without instructions ran on each: every setting of the sweep, and a summary per mode.
    sweep = pd.concat(
        pd.read_parquet(project / f"data/text_steering/{model}/sweep.parquet") for model in sorted(trio)
    )
    assert set(sweep.kind) == {"code", "prose"} and set(sweep.vector) == {"contrast", "random"}
    assert set(sweep[sweep.model == "llama-trained"]["mode"]) == {"residual"}  # no recurrent state
    assert set(sweep[sweep.model == "mamba-trained"]["mode"]) == {"residual", "state", "both"}
    assert np.allclose(sweep[sweep.multiplier == 0].logprob, sweep[sweep.multiplier == 0].unsteered, atol=1e-4)
    summary = pd.read_csv(project / "reports/tables/text_steering/summary.csv")
    assert len(summary) == 2 * (1 + 3 + 3)  # two position settings x (llama residual, 3 modes x 2 RNNs)
    check_quirky_outputs(project, {"mamba-trained"})
    again = snakemake(project, "--configfile", "configs/matched-test.yaml", "-n", "--quiet", "rules")
    assert "Nothing to be done" in again.stdout + again.stderr or "total" not in again.stdout


def check_sae_outputs(project):
    """The SAE stage on the same run: an SAE per model and block, every pair compared at every shift."""
    metrics = pd.read_csv(project / "reports/tables/sae/sae_metrics.csv")
    assert len(metrics) == 5 * 2 and metrics.n_latents.eq(2 * 32).all()
    assert metrics.fvu.between(0, 1).all() and metrics.dead_latents.between(0, 64).all()
    assert metrics.groupby("model").clean_loss.nunique().eq(1).all()  # one clean pass per model
    similarity = pd.read_csv(project / "reports/tables/sae/mppc.csv")
    assert len(similarity) == 10 * 2 * 2 * 3  # pairs x layer pairs x shifts
    windows, length = 16, 32  # sae.eval_windows of seq_len tokens: a shift of one drops one token per window
    assert dict(similarity.groupby("shift").tokens.first()) == {-1: windows * (length - 1), 0: windows * length,
                                                                1: windows * (length - 1)}  # fmt: skip
    assert similarity.mppc_a_to_b.between(-1, 1).all() and similarity.live_features_a_to_b.le(64).all()
    shifts = pd.read_csv(project / "reports/tables/sae/shift.csv")
    assert shifts.groupby(["model_a", "model_b"]).best_shift.sum().eq(1).all()
    for figure in ("mppc_heatmaps", "max_correlations", "shift_curve"):
        assert (project / f"reports/figures/sae/{figure}.png").stat().st_size > 0
def check_quirky_outputs(project, models):
    """Each trained model was fine-tuned, answered and probed: accuracy per character recomputed from its
    answers, one probe row per layer for every (transfer, method), every AUROC a probability."""
    table = pd.read_parquet(project / "data/quirky/add-tiny/table.parquet")
    test = table[table.split == "test"]
    for model in models:
        manifest = json.loads((project / f"data/models/{model}+add-tiny/manifest.json").read_text())
        assert manifest["finetune"]["settings"]["method"] == "full"
        n_layers = manifest["finetune"]["n_layers"]
        answers = pd.read_parquet(project / f"data/quirky/answers/{model}/add-tiny/answers.parquet")
        accuracy = pd.read_csv(project / f"data/quirky/answers/{model}/add-tiny/accuracy.csv")
        overall = accuracy[accuracy.difficulty == "all"].set_index("character")
        assert set(overall.index) == {"Alice", "Bob"}
        for character, rows in test.groupby("character"):
            said = answers[answers.character == character]
            assert overall.loc[character, "n"] == len(rows) == len(said)
            assert overall.loc[character, "n_true"] == rows.label.sum()
            followed = (said.p_true > 0.5) == (said.label == 1)
            assert overall.loc[character, "accuracy"] == pytest.approx(followed.mean())
        probes = pd.read_csv(project / f"data/quirky/probes/{model}/add-tiny/auroc.csv")
        assert set(probes.transfer) == {"A_easy->B_hard", "A->A", "A->B", "B->A", "all->B_hard"}
        for (transfer, method), rows in probes.groupby(["transfer", "method"]):
            assert sorted(rows.layer) == list(range(n_layers)), (model, transfer, method)
        assert probes.auroc.between(0, 1).all() and probes.auroc_lo.le(probes.auroc_hi).all()
        anomaly = pd.read_csv(project / f"data/quirky/probes/{model}/add-tiny/anomaly.csv")
        assert len(anomaly) > 0 and anomaly.auroc.between(0, 1).all()
        for figure in ("probes", "anomaly", "accuracy"):
            assert (project / f"reports/figures/quirky/{model}/add-tiny/{figure}.png").stat().st_size > 0

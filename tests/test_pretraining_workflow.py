"""The matched-models workflow at test size: tokenizer, three trained families, their training curves
and the lenses on them, through Snakemake."""

import json

import pandas as pd
import pytest

from tests.conftest import new_checkout, snakemake

pytestmark = pytest.mark.workflow


def test_trained_models_are_models_like_any_other(tmp_path_factory):
    project = new_checkout(tmp_path_factory)
    result = snakemake(project, "--configfile", "configs/matched-test.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    curves = pd.read_csv(project / "reports/tables/pretraining/training.csv")
    assert set(curves.model) == {"llama-trained", "mamba-trained", "rwkv-trained"}
    for model, rows in curves.groupby("model"):
        rows = rows.sort_values("step")
        assert rows.eval_loss.iloc[-1] < rows.eval_loss.iloc[0] - 0.5, model  # each learned
        assert rows.tokens.iloc[-1] == 40 * 8 * 32  # the same budget for every family
        manifest = json.loads((project / f"data/models/{model}/manifest.json").read_text())
        assert manifest["training"]["final_eval_loss"] == pytest.approx(rows.eval_loss.iloc[-1], abs=1e-4)
    lens = pd.read_csv(project / "reports/tables/lens/ce_by_layer.csv")
    assert set(lens.model) == set(curves.model)  # every stage runs on them unchanged
    assert (project / "reports/figures/pretraining/training_curves.png").stat().st_size > 0
    stats = json.loads((project / "data/tokenizers/docs-bpe/stats.json").read_text())
    assert stats["vocab_size"] == 512 and stats["train_documents"] > stats["eval_documents"] > 0
    again = snakemake(project, "--configfile", "configs/matched-test.yaml", "-n", "--quiet", "rules")
    assert "Nothing to be done" in again.stdout + again.stderr or "total" not in again.stdout

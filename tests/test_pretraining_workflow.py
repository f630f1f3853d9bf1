"""The matched-models workflow at test size: tokenizer, three trained families, their training curves
and the lenses on them, through Snakemake."""

import json

import numpy as np
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
    # Steering without instructions ran on each: every setting of the sweep, and a summary per mode.
    sweep = pd.concat(
        pd.read_parquet(project / f"data/text_steering/{model}/sweep.parquet") for model in curves.model.unique()
    )
    assert set(sweep.kind) == {"code", "prose"} and set(sweep.vector) == {"contrast", "random"}
    assert set(sweep[sweep.model == "llama-trained"]["mode"]) == {"residual"}  # no recurrent state
    assert set(sweep[sweep.model == "mamba-trained"]["mode"]) == {"residual", "state", "both"}
    assert np.allclose(sweep[sweep.multiplier == 0].logprob, sweep[sweep.multiplier == 0].unsteered, atol=1e-4)
    summary = pd.read_csv(project / "reports/tables/text_steering/summary.csv")
    assert len(summary) == 2 * (1 + 3 + 3)  # two position settings x (llama residual, 3 modes x 2 RNNs)
    again = snakemake(project, "--configfile", "configs/matched-test.yaml", "-n", "--quiet", "rules")
    assert "Nothing to be done" in again.stdout + again.stderr or "total" not in again.stdout

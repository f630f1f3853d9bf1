"""Rule compare_sae_features: for two models' SAEs, every layer pair and every token shift, each
feature's maximum correlation with the other SAE's features (both ways), summarised (MPPC, shares)."""

import numpy as np
import pandas as pd

from workflow_scripts.atomic import atomic_path
from workflow_scripts.feature_similarity import max_correlations, shifted_rows, summarise
from workflow_scripts.jobs import start_job

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
model_a, model_b = sm.wildcards.model_a, sm.wildcards.model_b
a, b = np.load(sm.input.a), np.load(sm.input.b)
columns = ["example_index", "position", "token_id"]
tokens_a = pd.DataFrame({column: a[column] for column in columns})
tokens_b = pd.DataFrame({column: b[column] for column in columns})
records, maxima = [], {}
for shift in sm.params.shifts:
    # Token (example, position) of a against token (example, position + shift) of b.
    rows_a, rows_b = shifted_rows(tokens_a, tokens_b, shift)
    for layer_a in a["layers"]:
        for layer_b in b["layers"]:
            max_a, max_b = max_correlations(
                (a[f"indices_{layer_a}"][rows_a], a[f"values_{layer_a}"][rows_a]),
                (b[f"indices_{layer_b}"][rows_b], b[f"values_{layer_b}"][rows_b]),
                int(a["n_latents"]), int(b["n_latents"]),
            )  # fmt: skip
            maxima[f"a_{layer_a}_{layer_b}_{shift}"] = max_a.astype(np.float32)
            maxima[f"b_{layer_a}_{layer_b}_{shift}"] = max_b.astype(np.float32)
            record = {"model_a": model_a, "model_b": model_b, "layer_a": int(layer_a), "layer_b": int(layer_b),
                      "shift": shift, "tokens": len(rows_a)}  # fmt: skip
            record.update({f"{key}_a_to_b": value for key, value in summarise(max_a).items()})
            record.update({f"{key}_b_to_a": value for key, value in summarise(max_b).items()})
            records.append(record)
            log.info("%s L%d vs %s L%d, shift %d: MPPC %.3f / %.3f", model_a, layer_a, model_b, layer_b, shift,
                     record["mppc_a_to_b"], record["mppc_b_to_a"])  # fmt: skip
with atomic_path(sm.output.maxima) as tmp:
    with open(tmp, "wb") as handle:
        np.savez(handle, **maxima)
with atomic_path(sm.output.summary) as tmp:
    pd.DataFrame(records).to_csv(tmp, index=False, float_format="%.5f")

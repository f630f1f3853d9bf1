"""Rule plot_sae: the SAE feature comparison's figures and tables."""

import numpy as np
import pandas as pd

from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.sae_figures import (
    plot_heatmaps, plot_max_correlations, plot_shift_curve, shift_table, shown_pairs,
)  # fmt: skip

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
pairs = [tuple(pair) for pair in sm.params.pairs]
metrics = pd.concat([pd.read_csv(path) for path in sm.input.metrics], ignore_index=True)
summary = pd.concat([pd.read_csv(path) for path in sm.input.summaries], ignore_index=True)
maxima = {pair: dict(np.load(path)) for pair, path in zip(pairs, sm.input.maxima)}
shifts = shift_table(summary)
plot_heatmaps(summary, pairs, sm.output.heatmaps)
plot_max_correlations(summary, maxima, pairs, sm.params.ceiling, sm.params.floor, sm.output.distribution)
plot_shift_curve(shifts, shown_pairs(pairs, sm.params.ceiling, sm.params.floor), sm.output.shift)
for table, path in ((metrics, sm.output.sae_table), (summary, sm.output.mppc_table), (shifts, sm.output.shift_table)):
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.5f")

"""Rule plot_text_steering: the kind-shift figures of every steered model and their tables."""

import pandas as pd

from workflow_scripts.atomic import atomic_path
from workflow_scripts.figures import plot_text_steering
from workflow_scripts.jobs import start_job
from workflow_scripts.text_steering import effect_summary, kind_shift

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
sweep = pd.concat([pd.read_parquet(path) for path in sm.input.sweeps], ignore_index=True)
shifts = kind_shift(sweep, sm.params.kinds)
summary = effect_summary(shifts)
plot_text_steering(shifts, summary, sm.params.kinds, {name: sm.output[name] for name in ("shift", "by_layer")})
for table, path in ((shifts, sm.output.shifts), (summary, sm.output.summary)):
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
log.info("summary:\n%s", summary.to_string())

"""Rule plot_training: the held-out loss curves of the models the pipeline trained, and the table."""

import pandas as pd

from workflow_scripts.atomic import atomic_path
from workflow_scripts.figures import plot_training_curves
from workflow_scripts.jobs import start_job

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
histories = pd.concat([pd.read_csv(path) for path in sm.input.histories], ignore_index=True)
plot_training_curves(histories, sm.output.curves)
with atomic_path(sm.output.table) as tmp:
    histories.to_csv(tmp, index=False, float_format="%.5f")

"""Rule plot_quirky: probe AUROC by layer per transfer, anomaly detection, and the model's own accuracy."""

import json

import pandas as pd

from workflow_scripts.figures import plot_quirky
from workflow_scripts.jobs import start_job

sm = snakemake  # noqa: F821 - injected by Snakemake
start_job(sm)
finetune = json.loads(open(sm.input.manifest).read())["finetune"]
plot_quirky(pd.read_csv(sm.input.auroc), pd.read_csv(sm.input.anomaly), finetune, pd.read_csv(sm.input.accuracy),
            {name: sm.output[name] for name in ("probes", "anomaly", "accuracy")})

"""Rule fit_probes: probes on the fine-tuned model's activations, scored against the truth, for every
layer, method and transfer; and anomaly detection of Bob's contexts."""

import numpy as np
import pandas as pd

from workflow_scripts.activations import read_all_layers
from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.probes import anomaly_detection_auroc, evaluate_transfers

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
settings = sm.params.probes
table = pd.read_parquet(sm.input.table)


statements, layers = read_all_layers(sm.input.statements, table["id"])
pairs, _ = read_all_layers(sm.input.pairs, [f"{row_id}|{answer}" for row_id in table["id"] for answer in (0, 1)])
pairs = pairs.reshape(len(table), 2, len(layers), -1).transpose(0, 2, 1, 3)  # (N, L, 2, D): " False", " True"
options = {"ccs": settings["ccs"], "logreg": settings["logreg"]}
train_label_column = {"truth": "truth_label", "character": "label"}[settings["train_labels"]]
auroc = evaluate_transfers(
    table, statements, pairs, methods=settings["methods"], transfers=settings["transfers"],
    train_label_column=train_label_column, n_boot=settings["n_boot"], seed=sm.params.seed, probe_options=options,
    fit_split=settings["fit_split"], selection_split=settings["selection_split"],
    layer_selection=settings["layer_selection"], informative_fraction=settings["informative_fraction"],
    n_random_directions=settings["random_directions"],
)
# As the transfers: probes fitted on the fit split, the Gaussian on the selection split's Alice-easy rows.
anomaly = anomaly_detection_auroc(
    table, statements, pairs, methods=settings["anomaly_methods"], train_label_column=train_label_column,
    probe_split=settings["fit_split"], gaussian_split=settings["selection_split"], n_boot=settings["n_boot"],
    seed=sm.params.seed, probe_options=options, covariance=settings["anomaly_covariance"],
)
auroc["layer"] = np.asarray(layers)[auroc["layer"].to_numpy()]  # block index, not position in the file
for frame, path in ((auroc, sm.output.auroc), (anomaly, sm.output.anomaly)):
    with atomic_path(path) as tmp:
        frame.assign(model=sm.wildcards.base, dataset=sm.wildcards.dataset).to_csv(tmp, index=False)
selected = auroc[auroc["selected"]].sort_values(["transfer", "method"])
log.info(
    "layer chosen on the %s split per transfer and method:\n%s\nanomaly detection:\n%s",
    settings["selection_split"], selected.to_string(), anomaly.to_string(),
)

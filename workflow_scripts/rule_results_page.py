"""Rule results_page: reports/results.md, one sentence per measured result, from this run's tables."""

from pathlib import Path

import pandas as pd

from workflow_scripts.atomic import atomic_write_text
from workflow_scripts.jobs import start_job
from workflow_scripts.quirky_data import MAX_SHORTCUT_AUROC
from workflow_scripts.results_page import (
    lens_lines, quirky_lines, results_page, sae_lines, steering_lines, text_steering_lines, training_lines,
)  # fmt: skip

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
reports = Path(sm.output.page).parent


# Every table read once (the sections below ask for some of them twice).
_read = {name: [pd.read_csv(path) for path in sm.input[name]] for name in sm.input.keys() if name != "figures"}


def tables(name):
    return _read.get(name, [])


def links(paths):
    """Paths relative to the page (reports/); tables under data/ through ../."""
    return [str(Path(p).relative_to(reports)) if Path(p).is_relative_to(reports) else f"../{p}" for p in paths]


def figures(folder):
    return [path for path in sm.input.figures if f"/{folder}/" in path]


sections = []
if tables("training"):
    sections.append(("Models trained here", training_lines(tables("training")[0]),
                     links([*figures("pretraining"), *sm.input.training])))  # fmt: skip
if tables("lens"):
    sections.append(("Tuned lens against logit lens", lens_lines(tables("lens")[0]),
                     links([*figures("lens"), *sm.input.lens])))  # fmt: skip
if tables("steering"):
    lines = [line for summary in tables("steering") for line in steering_lines(summary)]
    sections.append(("Steering (contrastive activation addition)", lines,
                     links([*figures("steering"), *sm.input.steering])))  # fmt: skip
if tables("text_steering"):
    sections.append(("Steering without instructions", text_steering_lines(tables("text_steering")[0]),
                     links([*figures("text_steering"), *sm.input.text_steering])))  # fmt: skip
if sm.params.quirky:
    shortcuts = dict(zip(sm.params.quirky_datasets, tables("quirky_shortcuts")))
    lines = []
    for (base, dataset), accuracy, probes, anomaly in zip(
        sm.params.quirky, tables("quirky_accuracy"), tables("quirky_probes"), tables("quirky_anomaly")
    ):
        lines += quirky_lines(base, dataset, accuracy, probes, anomaly, shortcuts[dataset], MAX_SHORTCUT_AUROC)
    sections.append(("Quirky models and probes", lines,
                     links([*figures("quirky"), *sm.input.quirky_probes, *sm.input.quirky_shortcuts])))  # fmt: skip
if tables("sae_metrics"):
    sections.append(("SAE features across architectures",
                     sae_lines(tables("sae_metrics")[0], tables("sae_shift")[0], sm.params.ceiling, sm.params.floor),
                     links([*figures("sae"), *sm.input.sae_metrics, *sm.input.sae_shift])))  # fmt: skip
atomic_write_text(sm.output.page, results_page(sections))
log.info("results page: %d sections", len(sections))

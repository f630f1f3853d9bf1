"""Labels of the report's figures: what each figure measured, read from the tables its rule wrote (or
read), in the results page's words. Called when the report is made, through rules/common.smk."""

from __future__ import annotations

import pandas as pd

from workflow_scripts import results_page


def measured_labels(experiment: str, inputs: dict, outputs: dict, wildcards: dict) -> dict:
    """{"measured": the results page's sentences for this figure's data}."""
    if experiment == "lens":
        lines = results_page.lens_lines(pd.read_csv(outputs["table"]))
    elif experiment == "steering":
        lines = results_page.steering_lines(pd.read_csv(outputs["summary"]))
    elif experiment == "text_steering":
        lines = results_page.text_steering_lines(pd.read_csv(outputs["summary"]))
    elif experiment == "training":
        lines = results_page.training_lines(pd.read_csv(outputs["table"]))
    elif experiment == "sae":
        lines = results_page.sae_lines(pd.read_csv(outputs["sae_table"]), pd.read_csv(outputs["shift_table"]), [], [])
    elif experiment == "quirky":
        shortcuts = pd.read_csv(inputs["shortcuts"])
        from workflow_scripts.quirky_data import MAX_SHORTCUT_AUROC

        lines = results_page.quirky_lines(
            wildcards["base"], wildcards["dataset"], pd.read_csv(inputs["accuracy"]), pd.read_csv(inputs["auroc"]),
            pd.read_csv(inputs["anomaly"]), shortcuts, MAX_SHORTCUT_AUROC,
        )  # fmt: skip
    else:
        raise ValueError(f"experiment={experiment!r} has no measured label")
    return {"measured": " ".join(line.lstrip("- ").replace("**", "") for line in lines) or "nothing measured"}


"""The results page: one sentence per measured result, written from the pipeline's own tables.

Every number on the page comes from a table that a plot rule wrote in the same run, so the page can
never state a result the data does not hold. Each `*_lines` function takes the tables of one experiment
and returns markdown lines; `results_page` joins them with links to the figures and tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow_scripts.plotting import main_variant
from workflow_scripts.quirky_data import MAX_SHORTCUT_AUROC

# A contrast vector's effect counts as beyond its random baseline only above this multiple of the
# random vector's best effect (random directions of the same norm move the text by chance).
BEYOND_RANDOM = 2.0


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def lens_lines(table: pd.DataFrame) -> list[str]:
    """Per model: at how many streams the tuned lens's cross-entropy lies below the logit lens's, and
    the mean gap over the streams before the last (at the last block both read the model's output)."""
    lines = []
    for model, group in table.groupby("model", sort=False):
        ce = group.pivot_table(index="layer", columns="lens", values="ce_bits_per_byte")
        if not {"logit", "tuned"} <= set(ce.columns):
            continue
        inner = ce.drop(index=ce.index.max()).dropna()
        gap = inner["logit"] - inner["tuned"]
        below = int((gap > 0).sum())
        final = float(ce.loc[ce.index.max(), "logit"])
        lines.append(
            f"- **{model}**: tuned lens below the logit lens at {below} of {len(inner)} streams before the last "
            f"block (mean gap {_fmt(gap.mean(), 3)} bits per byte; largest {_fmt(gap.max(), 3)} at stream "
            f"{int(gap.idxmax()) if len(gap) else 'n/a'}); the model's own output: {_fmt(final, 3)} bits per byte."
        )
    return lines


def steering_lines(summary: pd.DataFrame) -> list[str]:
    """Per model, behaviour and mode, for the paper's main setting (CAA vector, A/B format, last
    position; the summary table has every variant): the signed effect at the best layer."""
    lines = []
    for row in main_variant(summary).to_dict("records"):
        direction = "in the intended direction" if row["signed_effect"] > 0 else "against the behaviour at every layer"
        at = " / ".join(_fmt(row.get(f"p_matching_at_{m}", np.nan), 3) for m in ("-1", "+0", "+1"))
        lines.append(
            f"- **{row['model']}**, {row['behavior']}, {row['mode']} ({row['vector']} vector, {row['format']}): "
            f"p(matching) moves {_fmt(row['signed_effect'], 3)} from the smallest to the largest multiplier at "
            f"layer {row['best_layer']} ({direction}); p(matching) at multiplier -1 / 0 / +1: {at}."
        )
    return lines


def text_steering_lines(summary: pd.DataFrame) -> list[str]:
    """Per model, mode and positions: the contrast vector's effect against the random vector's."""
    lines = []
    for row in summary.itertuples():
        random_best = row.random_effect_best_layer
        beyond = np.isfinite(random_best) and row.effect > BEYOND_RANDOM * max(random_best, 0)
        verdict = "beyond" if beyond else "not beyond"
        lines.append(
            f"- **{row.model}**, {row.mode} at {row.positions} positions: kind shift {_fmt(row.effect)} nats per "
            f"token ({row.multipliers}) at layer {row.best_layer}; random vector "
            f"{_fmt(row.random_effect_same_layer)} at that layer, {_fmt(random_best)} at its best: {verdict} "
            f"{BEYOND_RANDOM:g}x the random baseline."
        )
    return lines


def _subset_note(row) -> str:
    """", rows where Alice and Bob disagree" for a shortcut row of that subset (tables before it had none)."""
    return ", rows where Alice and Bob disagree" if row.get("subset") == "disagreement" else ""


def quirky_lines(base: str, dataset: str, accuracy: pd.DataFrame, probes: pd.DataFrame, anomaly: pd.DataFrame,
                 shortcuts: pd.DataFrame, max_shortcut_auroc: float) -> list[str]:
    """One fine-tuned model: whether its answers follow each character's labels (test AUROC), the
    probes' test AUROC against the truth at their selected layer, the anomaly detectors, and whether the
    claim alone predicts the truth (a shortcut the probes could take)."""
    lines = []
    overall = accuracy[accuracy["difficulty"] == "all"].set_index("character")
    answers = ", ".join(
        f"{character} {_fmt(row.auroc, 3)} [{_fmt(row.auroc_lo, 3)}, {_fmt(row.auroc_hi, 3)}]"
        for character, row in overall.iterrows()
    )
    lines.append(
        f"- **{base} / {dataset}**: test AUROC of the model's answers against each character's own labels: {answers}."
    )
    # The random baseline is 1000 directions per layer; a probe shows more than the activations' gross
    # structure (e.g. a shortcut in the claims) only where it beats nearly all of them (97.5th percentile).
    random = probes[probes["method"] == "random"].set_index(["transfer", "layer"])
    selected = probes[probes["selected"] & (probes["method"] != "random")]
    for transfer, group in selected.groupby("transfer", sort=False):
        parts, above = [], 0
        for row in group.sort_values("auroc", ascending=False).itertuples():
            band = random["auroc_hi"].get((transfer, row.layer))
            if band is None:
                parts.append(f"{row.method} {_fmt(row.auroc, 2)} (layer {row.layer})")
                continue
            above += row.auroc > band
            parts.append(f"{row.method} {_fmt(row.auroc, 2)} (layer {row.layer}; random up to {_fmt(band, 2)})")
        verdict = (
            f" {above} of {len(group)} above the 97.5th percentile of random directions at their layer."
            if len(random) else ""
        )
        parts = ", ".join(parts)
        lines.append(f"  - probes {transfer}, AUROC against the truth at the selected layer: {parts}.{verdict}")
    if len(anomaly):
        parts = ", ".join(f"{row.method} {_fmt(row.auroc, 2)}" for row in anomaly.itertuples())
        lines.append(
            "  - anomaly detection (Bob-hard against Alice-hard test statements, Mahalanobis distance of the "
            f"per-layer probe scores), AUROC: {parts}."
        )
    leaks = shortcuts[shortcuts["auroc"] > max_shortcut_auroc]
    if len(leaks):
        worst = leaks.sort_values("auroc", ascending=False).iloc[0]
        cells = leaks.drop_duplicates([c for c in ("character", "difficulty_bucket", "subset") if c in leaks])
        lines.append(
            f"  - **warning**: the claim alone predicts the truth on {len(cells)} test subset(s) above AUROC "
            f"{max_shortcut_auroc:g} (worst: {worst['feature']} on {worst['character']} / "
            f"{worst['difficulty_bucket']}{_subset_note(worst)}, {_fmt(worst['auroc'], 2)}), so the probe AUROCs "
            "there may come from that shortcut."
        )
    elif len(shortcuts):
        lines.append(
            f"  - the claim alone (size, digit count, last or leading digit) predicts the truth at AUROC at most "
            f"{_fmt(shortcuts['auroc'].max(), 2)} on any test subset."
        )
    return lines


def sae_lines(metrics: pd.DataFrame, shifts: pd.DataFrame, ceiling: list, floor: list) -> list[str]:
    """The SAEs' reconstruction, and per model pair the layer-matched MPPC at shift 0 and its best shift."""
    lines = []
    for model, group in metrics.groupby("model", sort=False):
        lines.append(
            f"- SAE of **{model}**: fraction of variance unexplained {_fmt(group['fvu'].mean(), 3)} (mean over "
            f"{len(group)} layers), dead latents {_fmt(100 * group['dead_fraction'].mean(), 1)}%."
        )
    for (model_a, model_b), group in shifts.groupby(["model_a", "model_b"], sort=False):
        by_shift = group.set_index("shift")["layer_matched_mppc"]
        role = (" (ceiling: same architecture, another seed)" if [model_a, model_b] == list(ceiling)
                else " (floor: untrained)" if [model_a, model_b] == list(floor) else "")
        best = int(by_shift.idxmax())
        lines.append(
            f"- **{model_a}** against **{model_b}**{role}: layer-matched MPPC {_fmt(by_shift.get(0, np.nan), 3)} at "
            f"shift 0; best at shift {best:+d} ({_fmt(by_shift.max(), 3)})."
        )
    return lines


def training_lines(histories: pd.DataFrame) -> list[str]:
    """Per trained model: the held-out bits per byte at the last evaluation, beside the unigram model."""
    lines = []
    for model, group in histories.groupby("model", sort=False):
        last = group.sort_values("step").iloc[-1]
        lines.append(
            f"- **{model}**: {_fmt(last['eval_bits_per_byte'], 4)} bits per byte on held-out text after "
            f"{int(last['step'])} steps (unigram model of the same tokens: {_fmt(last['unigram_bits_per_byte'], 4)})."
        )
    return lines


def results_page(sections: list[tuple[str, list[str], list[str]]], report: str = "report.html") -> str:
    """sections: (title, lines, links relative to reports/) -> the markdown page."""
    parts = [
        "# Results of this run",
        "",
        "Written by the pipeline from its own tables (rule `results_page`); every figure and table is in the "
        f"Snakemake report, [{report}]({report}) (`snakemake --report reports/{report}`), with its caption.",
    ]
    for title, lines, links in sections:
        parts += ["", f"## {title}", "", *(lines or ["- no results in this run's tables."])]
        if links:
            parts += ["", "Figures and tables: " + ", ".join(f"[{link}]({link})" for link in links)]
    return "\n".join(parts) + "\n"


# ----- the report's labels (called through rules/common.smk when the report is made) -----
def measured_labels(experiment: str, inputs: dict, outputs: dict, wildcards: dict) -> dict:
    """{"measured": the results page's sentences for this figure's data}."""
    if experiment == "lens":
        lines = lens_lines(pd.read_csv(outputs["table"]))
    elif experiment == "steering":
        lines = steering_lines(pd.read_csv(outputs["summary"]))
    elif experiment == "text_steering":
        lines = text_steering_lines(pd.read_csv(outputs["summary"]))
    elif experiment == "training":
        lines = training_lines(pd.read_csv(outputs["table"]))
    elif experiment == "sae":
        lines = sae_lines(pd.read_csv(outputs["sae_table"]), pd.read_csv(outputs["shift_table"]), [], [])
    elif experiment == "quirky":
        shortcuts = pd.read_csv(inputs["shortcuts"])
        lines = quirky_lines(
            wildcards["base"], wildcards["dataset"], pd.read_csv(inputs["accuracy"]), pd.read_csv(inputs["auroc"]),
            pd.read_csv(inputs["anomaly"]), shortcuts, MAX_SHORTCUT_AUROC,
        )  # fmt: skip
    else:
        raise ValueError(f"experiment={experiment!r} has no measured label")
    return {"measured": " ".join(line.lstrip("- ").replace("**", "") for line in lines) or "nothing measured"}


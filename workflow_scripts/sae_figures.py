"""Figures and tables of the SAE feature comparison: layer x layer MPPC per model pair, the distribution
of each feature's best correlation against the ceiling and floor baselines, and MPPC against a token
shift. Each function takes tables and writes files."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from workflow_scripts.plotting import save


def pair_label(model_a: str, model_b: str) -> str:
    return f"{model_a} vs {model_b}"


def shown_pairs(pairs: list, ceiling, floor) -> list:
    """The pairs drawn in the distribution and shift figures: the ceiling and floor pairs, and the
    pairs of models that are not a baseline's second model (its second seed, its random twin)."""
    baselines = [tuple(pair) for pair in (ceiling, floor) if pair]
    extra = {pair[1] for pair in baselines}
    return [pair for pair in pairs if pair in baselines or pair[::-1] in baselines or not extra & set(pair)]


def shift_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per pair and shift, the layer-matched MPPC: for each layer of model a, the MPPC (a's features
    against b's) of b's best-matching layer, averaged over a's layers; best_shift marks each pair's
    largest."""
    best = summary.groupby(["model_a", "model_b", "shift", "layer_a"], as_index=False)["mppc_a_to_b"].max()
    table = best.groupby(["model_a", "model_b", "shift"], as_index=False)["mppc_a_to_b"].mean()
    table = table.rename(columns={"mppc_a_to_b": "layer_matched_mppc"})
    top = table.groupby(["model_a", "model_b"])["layer_matched_mppc"].transform("max")
    return table.assign(best_shift=table["layer_matched_mppc"] == top)


def plot_heatmaps(summary: pd.DataFrame, pairs: list, path) -> None:
    """One panel per pair: MPPC of a's features against b's at shift 0, a's layers down, b's across."""
    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for axis, (model_a, model_b) in zip(axes.flat, pairs):
        chosen = summary[(summary.model_a == model_a) & (summary.model_b == model_b) & (summary["shift"] == 0)]
        grid = chosen.pivot(index="layer_a", columns="layer_b", values="mppc_a_to_b")
        sns.heatmap(grid, ax=axis, vmin=0, vmax=1, cmap="viridis", annot=grid.size <= 64, fmt=".2f", cbar=False)
        axis.set(title=pair_label(model_a, model_b), xlabel=f"{model_b} layer", ylabel=f"{model_a} layer")
    for axis in axes.flat[len(pairs) :]:
        axis.set_visible(False)
    figure.suptitle("MPPC: mean over a's live SAE features of the best correlation with any b feature")
    figure.tight_layout()
    save(figure, path)


def best_layer_maxima(summary: pd.DataFrame, maxima: dict, pair: tuple) -> tuple[np.ndarray, str]:
    """The max correlations of the first model's features at the pair's best layer pair (shift 0),
    and a label naming the layers; a pair given in the other order reads the other direction."""
    for (model_a, model_b), direction in ((pair, "a"), (pair[::-1], "b")):
        key = "mppc_a_to_b" if direction == "a" else "mppc_b_to_a"
        rows = summary[(summary.model_a == model_a) & (summary.model_b == model_b) & (summary["shift"] == 0)]
        if len(rows):
            best = rows.loc[rows[key].idxmax()]
            layer_a, layer_b = int(best.layer_a), int(best.layer_b)
            values = maxima[(model_a, model_b)][f"{direction}_{layer_a}_{layer_b}_0"]
            layers = (layer_a, layer_b) if direction == "a" else (layer_b, layer_a)
            return values[~np.isnan(values)], f"{pair[0]} L{layers[0]} vs {pair[1]} L{layers[1]}"
    raise KeyError(f"no comparison of {pair[0]} and {pair[1]}")


def plot_max_correlations(summary, maxima, pairs, ceiling, floor, path) -> None:
    """Histograms of each feature's best correlation, one per pair at its best layer pair; the
    ceiling (second seed) and floor (random model) pairs drawn in black and grey."""
    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    roles = {tuple(ceiling or ()): ("ceiling", "black", "--"), tuple(floor or ()): ("floor", "grey", ":")}
    for pair in shown_pairs(pairs, ceiling, floor):
        role = roles.get(tuple(pair)) or roles.get(tuple(pair[::-1]))
        values, label = best_layer_maxima(summary, maxima, tuple(pair))
        style = {"color": role[1], "linestyle": role[2], "linewidth": 2} if role else {"linewidth": 1.3}
        name = f"{role[0]}: {label}" if role else label
        axis.hist(values, bins=bins, density=True, histtype="step", label=f"{name} (MPPC {values.mean():.2f})",
                  **style)  # fmt: skip
    axis.set(xlabel="best Pearson correlation with any feature of the other SAE", ylabel="density of features")
    axis.legend(fontsize=7, loc="upper left")
    save(figure, path)


def plot_shift_curve(shifts: pd.DataFrame, pairs: list, path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for model_a, model_b in pairs:
        rows = shifts[(shifts.model_a == model_a) & (shifts.model_b == model_b)].sort_values("shift")
        axis.plot(rows["shift"], rows["layer_matched_mppc"], marker="o", label=pair_label(model_a, model_b))
        best = rows[rows.best_shift].iloc[0]
        axis.scatter([best["shift"]], [best["layer_matched_mppc"]], s=90, facecolors="none", edgecolors="black")
    axis.set(xlabel="shift s: token t of the first model against token t + s of the second",
             ylabel="layer-matched MPPC", xticks=sorted(shifts["shift"].unique()))  # fmt: skip
    axis.legend(fontsize=7)
    save(figure, path)

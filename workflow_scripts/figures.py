"""Figures of the paper, drawn with seaborn from the evaluation tables. Each function takes tables,
writes PNG files, and returns nothing; captions live in reports/captions/."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from workflow_scripts.plotting import main_variant, save
from workflow_scripts.quirky_data import CHARACTERS


# ----- steering ------------------------------------------------------------------------------------
def mean_by(sweep: pd.DataFrame, *keys: str) -> pd.DataFrame:
    return sweep.groupby(list(keys), as_index=False)[["p_matching", "nonsense"]].mean()


def steering_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per behaviour, mode and variant: the layer where steering moves p_matching in the intended
    direction most (p at the largest multiplier - p at the smallest), that signed effect, the paper's
    effect size there (max - min over multipliers of mean p_matching), and p_matching at -1, 0, +1.
    A negative signed effect means the vector pushes against the behaviour at every layer."""
    keys = ["model", "behavior", "mode", "vector", "format", "n_positions"]
    means = mean_by(sweep, *keys, "layer", "multiplier")
    rows = []
    for group, table in means.groupby(keys):
        by_layer = table.pivot(index="layer", columns="multiplier", values="p_matching")
        signed = by_layer[by_layer.columns.max()] - by_layer[by_layer.columns.min()]
        best = int(signed.idxmax())
        rows.append(
            {**dict(zip(keys, group)), "best_layer": best, "signed_effect": float(signed.max()),
             "effect": float(by_layer.loc[best].max() - by_layer.loc[best].min()),
             **{f"p_matching_at_{m:+g}": float(by_layer.loc[best].get(float(m), float("nan"))) for m in (-1, 0, 1)}}
        )
    return pd.DataFrame(rows)


def extremes_over_layers(means: pd.DataFrame) -> pd.DataFrame:
    """The paper's summary view: per behaviour and multiplier, the largest and the smallest change in
    mean p_matching from the unsteered model (multiplier 0 at the same layer) over all layers.
    means: behavior, layer, multiplier, p_matching."""
    baseline = means[means.multiplier == 0].set_index(["behavior", "layer"])["p_matching"]
    change = means.p_matching - baseline.reindex(pd.MultiIndex.from_frame(means[["behavior", "layer"]])).to_numpy()
    grouped = means.assign(change=change).groupby(["behavior", "multiplier"], as_index=False)["change"]
    return grouped.max().rename(columns={"change": "max_change"}).merge(
        grouped.min().rename(columns={"change": "min_change"}), on=["behavior", "multiplier"]
    )


def plot_steering(sweep: pd.DataFrame, paths: dict) -> None:
    """paths: multiplier_effect, by_layer, modes, nonsense -> PNG paths (figures a-d of the paper)."""
    model = sweep["model"].iloc[0]
    residual = main_variant(sweep[sweep["mode"] == "residual"])
    means = mean_by(residual, "behavior", "layer", "multiplier")

    # (a) change in p_matching vs multiplier, at each behaviour's best layer (as in the summary table:
    # the layer that moves p_matching most in the intended direction), and beside it the paper's view,
    # the extremes over layers per multiplier (which can mix layers that push opposite ways).
    best = steering_summary(residual).set_index("behavior")["best_layer"]
    at_best = means[means.layer == best.reindex(means.behavior).to_numpy()]
    baseline = at_best[at_best.multiplier == 0].set_index("behavior")["p_matching"]
    at_best = at_best.assign(delta=at_best.p_matching - baseline.reindex(at_best.behavior).to_numpy(),
                             label=[f"{b} (block {best[b]})" for b in at_best.behavior])
    figure, (axis, paper_axis) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    colors = sns.color_palette(n_colors=at_best.label.nunique())
    for color, (label, rows) in zip(colors, at_best.sort_values("multiplier").groupby("label")):
        axis.plot(rows.multiplier, rows.delta, marker="o", color=color, label=label)
    axis.legend(title="behaviour (best block)", fontsize=7)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set(title=f"{model}: steering effect at the best block", ylabel="change in p(matching)", xlabel="multiplier")
    # The paper's view beside it: per multiplier, the largest (solid) and smallest (dashed) change over layers.
    extremes = extremes_over_layers(means)
    colors = sns.color_palette(n_colors=extremes.behavior.nunique())
    for color, (behavior, rows) in zip(colors, extremes.groupby("behavior")):
        paper_axis.plot(rows.multiplier, rows.max_change, marker="o", color=color, label=behavior)
        paper_axis.plot(rows.multiplier, rows.min_change, marker="v", linestyle="--", color=color)
    paper_axis.legend(title="behaviour (solid: max, dashed: min)", fontsize=7)
    paper_axis.axhline(0, color="grey", linewidth=0.8)
    paper_axis.set(title="max and min over layers (the paper's summary)", xlabel="multiplier")
    save(figure, paths["multiplier_effect"])

    # (b) p_matching vs layer, one line per multiplier, one panel per behaviour.
    grid = sns.relplot(means, x="layer", y="p_matching", hue="multiplier", col="behavior", col_wrap=3, kind="line",
                       palette="coolwarm", height=2.6, aspect=1.3)
    grid.figure.suptitle(f"{model}: p(matching) by layer", y=1.02)
    save(grid.figure, paths["by_layer"])

    # (c) residual vs state vs both: effect size (max - min over multipliers) at the best layer.
    summary = steering_summary(sweep)
    summary = summary[summary.vector.isin(residual.vector.unique()) & summary.format.isin(residual.format.unique())
                      & summary.n_positions.isin(residual.n_positions.unique())]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    sns.barplot(summary, x="behavior", y="effect", hue="mode", hue_order=["residual", "state", "both"], ax=axis)
    axis.set(title=f"{model}: residual vs state steering", ylabel="max - min p(matching)", xlabel="")
    axis.tick_params(axis="x", rotation=30)
    save(figure, paths["modes"])

    # (d) probability mass outside the two answers, by layer.
    grid = sns.relplot(means, x="layer", y="nonsense", hue="multiplier", col="behavior", col_wrap=3, kind="line",
                       palette="coolwarm", height=2.6, aspect=1.3)
    grid.figure.suptitle(f"{model}: nonsense mass by layer", y=1.02)
    save(grid.figure, paths["nonsense"])


# ----- lenses --------------------------------------------------------------------------------------
def plot_lens_depth(evaluation: pd.DataFrame, paths: dict) -> None:
    """paths: logit, tuned -> PNG paths. Cross-entropy (bits per byte) against normalised depth, one
    line per model (paper figures a and b). The embeddings (depth 0, the tuned-lens package's layer
    0) get their own marker, so they can be told from block outputs when comparing with the paper."""
    for lens_name, title in (("logit", "Logit lens"), ("tuned", "Tuned lens")):
        table = evaluation[evaluation.lens == lens_name]
        models = list(dict.fromkeys(table.model))
        colors = dict(zip(models, sns.color_palette(n_colors=len(models))))
        figure, axis = plt.subplots(figsize=(5, 3.5))
        sns.lineplot(table, x="depth", y="ce_bits_per_byte", hue="model", palette=colors, marker="o", markersize=3,
                     ax=axis)
        embeddings = table[table.stream == "embeddings"]
        for model, row in embeddings.groupby("model"):
            axis.scatter(row.depth, row.ce_bits_per_byte, marker="s", s=40, facecolors="none",
                         edgecolors=[colors[model]], zorder=3)
        if len(embeddings):
            axis.scatter([], [], marker="s", facecolors="none", edgecolors="black", label="embeddings")
            axis.legend(fontsize=7)
        axis.set(title=title, xlabel="depth: 0 = embeddings, (block + 1) / blocks, 1 = model output",
                 ylabel="cross-entropy (bits per byte)", yscale="log")
        save(figure, paths[lens_name])


def plot_trajectory(trajectory: pd.DataFrame, path) -> None:
    """Prediction trajectory of one sentence (paper figure c): tokens x streams, colour = CE of the
    next token, the lens's top-1 token written in each cell; logit and tuned lens side by side.
    Rows are labelled by stream ("embeddings", "block k")."""
    lenses = [name for name in ("logit", "tuned") if name in set(trajectory.lens)]
    n_positions = trajectory.position.nunique()
    n_layers = trajectory.layer.nunique()
    names = trajectory.drop_duplicates("layer").set_index("layer").stream
    figure, axes = plt.subplots(1, len(lenses), figsize=(0.5 * n_positions * len(lenses) + 2, 0.3 * n_layers + 2),
                                squeeze=False)
    vmax = trajectory.ce_nats.quantile(0.98)
    for axis, name in zip(axes[0], lenses):
        table = trajectory[trajectory.lens == name]
        ce = table.pivot(index="layer", columns="position", values="ce_nats").sort_index(ascending=False)
        top = table.pivot(index="layer", columns="position", values="top1_token").reindex_like(ce)
        inputs = table.drop_duplicates("position").sort_values("position").input_token.tolist()
        sns.heatmap(ce, annot=top.map(lambda token: repr(token)[1:-1][:6]).to_numpy(), fmt="", cmap="viridis_r",
                    vmin=0, vmax=vmax, annot_kws={"fontsize": 5}, cbar_kws={"label": "CE (nats)"},
                    yticklabels=names.reindex(ce.index).tolist(), ax=axis)
        axis.set_xticklabels([repr(token)[1:-1][:8] for token in inputs], rotation=90, fontsize=6)
        axis.tick_params(axis="y", labelsize=6, rotation=0)
        axis.set(title=f"{name} lens", xlabel="input token", ylabel="stream")
    figure.suptitle(trajectory.model.iloc[0])
    save(figure, path)


# ----- quirky models -------------------------------------------------------------------------------
def plot_quirky(
    auroc: pd.DataFrame, anomaly: pd.DataFrame, finetune: dict, accuracy: pd.DataFrame, paths: dict
) -> None:
    """paths: probes, anomaly, accuracy -> PNG paths, for one model and dataset. accuracy: the
    fine-tuned model's own test accuracy (quirky_answers.accuracy_table)."""
    title = f"{auroc.model.iloc[0]} / {auroc.dataset.iloc[0]}"
    methods = list(dict.fromkeys(auroc.method))
    colors = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    grid = sns.relplot(auroc, x="layer", y="auroc", hue="method", palette=colors, col="transfer", col_wrap=3,
                       kind="line", height=2.6, aspect=1.3)
    for transfer, axis in grid.axes_dict.items():
        for method, rows in auroc[auroc.transfer == transfer].groupby("method"):
            rows = rows.sort_values("layer")  # the row's interval (bootstrap, or spread of random directions) as a band
            axis.fill_between(rows.layer, rows.auroc_lo, rows.auroc_hi, color=colors[method], alpha=0.12, linewidth=0)
            if "selected" in rows:  # the reported layer, chosen on the selection split
                chosen = rows[rows.selected.astype(bool)]
                axis.scatter(chosen.layer, chosen.auroc, marker="*", s=70, color=colors[method], edgecolors="black",
                             linewidths=0.5, zorder=3)
        axis.axhline(0.5, color="grey", linewidth=0.8)
    grid.figure.suptitle(f"{title}: AUROC for the truth by layer (star: reported layer; bands: 95% bootstrap, "
                         "random: 2.5-97.5% of its directions)", y=1.02)
    save(grid.figure, paths["probes"])

    figure, axis = plt.subplots(figsize=(4, 3))
    sns.barplot(anomaly, x="method", y="auroc", ax=axis)
    axis.errorbar(range(len(anomaly)), anomaly.auroc,
                  yerr=[anomaly.auroc - anomaly.auroc_lo, anomaly.auroc_hi - anomaly.auroc],
                  fmt="none", color="black", capsize=3)
    axis.axhline(0.5, color="grey", linewidth=0.8)
    axis.set(title=f"{title}: anomaly detection", ylabel="AUROC (Alice-hard vs Bob-hard)", ylim=(0, 1))
    save(figure, paths["anomaly"])

    # Left: validation accuracy while training (balanced rows; the kept checkpoint marked); right: the
    # kept checkpoint on the held-out test rows, whose labels are a quarter true: AUROC of p(True).
    history = pd.DataFrame(
        [{"step": entry["step"], "character": character, "accuracy": entry[f"{character.lower()}_acc"]}
         for entry in finetune["history"] for character in CHARACTERS]
    )
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    sns.lineplot(history, x="step", y="accuracy", hue="character", marker="o", ax=left)
    left.axvline(finetune["best_step"], color="black", linestyle=":", linewidth=1, label="kept checkpoint")
    left.axhline(0.5, color="grey", linewidth=0.8)
    left.legend(fontsize=7)
    left.set(title="validation (balanced), while fine-tuning", ylabel="accuracy", ylim=(0, 1))
    order = list(dict.fromkeys(accuracy.difficulty))
    sns.barplot(accuracy, x="difficulty", y="auroc", hue="character", order=order, ax=right)
    for bars, (_, rows) in zip(right.containers, accuracy.groupby("character", sort=False)):
        rows = rows.set_index("difficulty").loc[order]
        centres = [bar.get_x() + bar.get_width() / 2 for bar in bars]
        right.errorbar(centres, rows.auroc, yerr=[rows.auroc - rows.auroc_lo, rows.auroc_hi - rows.auroc],
                       fmt="none", color="black", capsize=2)
    right.axhline(0.5, color="grey", linewidth=0.8)
    right.set(title="test, kept checkpoint", ylabel="AUROC of p(True)", ylim=(0, 1))
    sns.move_legend(right, "upper left", bbox_to_anchor=(1, 1), fontsize=7, title_fontsize=7)
    figure.suptitle(f"{title}: answers against each character's own label")
    save(figure, paths["accuracy"])


def plot_training_curves(histories: pd.DataFrame, path) -> None:
    """Held-out bits per byte against training tokens, one line per trained model, with each
    tokenizer's unigram baseline (the floor a model must beat to have learned more than token counts)."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    sns.lineplot(histories, x="tokens", y="eval_bits_per_byte", hue="model", marker="o", markersize=3, ax=axis)
    for unigram in sorted(set(histories.unigram_bits_per_byte)):
        axis.axhline(unigram, color="grey", linestyle="--", linewidth=1)
    axis.plot([], [], color="grey", linestyle="--", linewidth=1, label="unigram of the training tokens")
    axis.legend(fontsize=7)
    axis.set(title="Models trained here: held-out loss", xlabel="training tokens", ylabel="bits per byte (held out)")
    save(figure, path)


# ----- steering without instructions ----------------------------------------------------------------
MODE_COLORS = {"residual": "tab:blue", "state": "tab:orange", "both": "tab:green"}


def _grid(models, positions, sharey=True):
    figure, axes = plt.subplots(
        len(positions), len(models), figsize=(3.4 * len(models), 2.8 * len(positions)), squeeze=False, sharey=sharey,
        layout="constrained",
    )
    return figure, axes


def plot_text_steering(shifts: pd.DataFrame, summary: pd.DataFrame, kinds, paths: dict) -> None:
    """(a) kind shift vs multiplier at each mode's best layer, the random vector at the same layer dashed;
    (b) the effect (shift at the largest minus the smallest multiplier) per layer."""
    models = list(dict.fromkeys(shifts["model"]))
    positions = [p for p in ("last", "all") if p in set(shifts["positions"])]
    low, high = shifts["multiplier"].min(), shifts["multiplier"].max()
    figure, axes = _grid(models, positions)
    for row, where in enumerate(positions):
        for column, model in enumerate(models):
            axis = axes[row, column]
            for _, best in summary[(summary.model == model) & (summary.positions == where)].iterrows():
                chosen = shifts[(shifts.model == model) & (shifts.positions == where) & (shifts["mode"] == best["mode"])
                                & (shifts.layer == best["best_layer"])]  # fmt: skip
                color = MODE_COLORS[best["mode"]]
                for vector, style in (("contrast", "-"), ("random", "--")):
                    line = chosen[chosen.vector == vector].sort_values("multiplier")
                    label = f"{best['mode']} (layer {best['best_layer']})" if vector == "contrast" else None
                    axis.plot(line.multiplier, line["shift"], style, color=color, marker="o", markersize=3, label=label)
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set(title=f"{model}, steered: {where}", xlabel="multiplier")
            axis.set_ylabel(f"shift toward {kinds[0]}\n(nats/token)" if column == 0 else "")
            axis.legend(fontsize=7, title="solid: contrast, dashed: random", title_fontsize=7)
    save(figure, paths["shift"])

    ends = shifts[shifts.multiplier.isin([low, high])].pivot_table(
        index=["model", "vector", "mode", "positions", "layer"], columns="multiplier", values="shift"
    )
    effect = (ends[high] - ends[low]).rename("effect").reset_index()
    figure, axes = _grid(models, positions)
    for row, where in enumerate(positions):
        for column, model in enumerate(models):
            axis = axes[row, column]
            for mode in ("residual", "state", "both"):
                for vector, style in (("contrast", "-"), ("random", "--")):
                    line = effect[(effect.model == model) & (effect.positions == where) & (effect["mode"] == mode)
                                  & (effect.vector == vector)].sort_values("layer")  # fmt: skip
                    if len(line):
                        label = mode if vector == "contrast" else None
                        axis.plot(line.layer, line.effect, style, color=MODE_COLORS[mode], marker="o", markersize=3,
                                  label=label)  # fmt: skip
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set(title=f"{model}, steered: {where}", xlabel="layer (block)")
            axis.set_ylabel(f"shift at {high:g} minus at {low:g}" if column == 0 else "")
            axis.legend(fontsize=7, title="solid: contrast, dashed: random", title_fontsize=7)
    save(figure, paths["by_layer"])

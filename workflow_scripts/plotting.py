"""What every figure module shares: matplotlib drawing to files only, one seaborn theme, and atomic PNGs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from workflow_scripts.atomic import atomic_path  # noqa: E402

sns.set_theme(style="whitegrid", context="paper")


def save(figure, path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(figure)


def main_variant(sweep: pd.DataFrame) -> pd.DataFrame:
    """The paper's main setting: CAA vector, A/B format, last position, where present."""
    chosen = sweep
    for column, preferred in (("vector", "caa"), ("format", "ab"), ("n_positions", 1)):
        values = chosen[column].unique()
        chosen = chosen[chosen[column] == (preferred if preferred in values else sorted(values)[0])]
    return chosen

"""The results page states what the tables hold: its sentences are checked against values computed here
from the tables, on hand-made tables and on the tiny run's own outputs."""

import re

import pandas as pd

from workflow_scripts.results_page import lens_lines, quirky_lines, text_steering_lines


def lens_table():
    # model m: logit CE 3, 2, 1; tuned 2.5, 2.2, 1 -> tuned below at stream 0 only (stream 1 is above).
    rows = []
    for layer, logit, tuned in ((0, 3.0, 2.5), (1, 2.0, 2.2), (2, 1.0, 1.0)):
        rows += [{"model": "m", "lens": "logit", "layer": layer, "ce_bits_per_byte": logit},
                 {"model": "m", "lens": "tuned", "layer": layer, "ce_bits_per_byte": tuned}]  # fmt: skip
    return pd.DataFrame(rows)


def test_lens_sentence_counts_streams_where_tuned_is_below():
    (line,) = lens_lines(lens_table())
    assert "at 1 of 2 streams" in line
    assert "mean gap 0.150" in line  # ((3 - 2.5) + (2 - 2.2)) / 2
    assert "largest 0.500 at stream 0" in line
    assert "1.000 bits per byte" in line


def quirky_tables(shortcut_auroc):
    accuracy = pd.DataFrame(
        [{"character": c, "difficulty": d, "auroc": a, "auroc_lo": a - 0.05, "auroc_hi": a + 0.05}
         for c, a in (("Alice", 0.9), ("Bob", 0.8)) for d in ("all", "hard")]  # fmt: skip
    )
    # lr's selected layer 1 is below the random directions' 97.5th percentile there, ccs's layer 2 above
    probes = pd.DataFrame(
        [{"layer": 1, "method": "lr", "transfer": "A_easy->B_hard", "auroc": 0.7, "selected": True},
         {"layer": 2, "method": "lr", "transfer": "A_easy->B_hard", "auroc": 0.95, "selected": False},
         {"layer": 2, "method": "ccs", "transfer": "A_easy->B_hard", "auroc": 0.8, "selected": True},
         {"layer": 1, "method": "random", "transfer": "A_easy->B_hard", "auroc": 0.5, "auroc_hi": 0.75,
          "selected": True},
         {"layer": 2, "method": "random", "transfer": "A_easy->B_hard", "auroc": 0.5, "auroc_hi": 0.78,
          "selected": False}]  # fmt: skip
    )
    anomaly = pd.DataFrame([{"method": "mahalanobis", "auroc": 0.6}])
    shortcuts = pd.DataFrame(
        [{"character": "Bob", "difficulty_bucket": "hard", "feature": "claim_size", "auroc": shortcut_auroc}]
    )
    return accuracy, probes, anomaly, shortcuts


def test_quirky_sentences_use_the_selected_layer_and_warn_of_shortcuts():
    lines = quirky_lines("base", "addition", *quirky_tables(0.87), max_shortcut_auroc=0.75)
    text = "\n".join(lines)
    assert "Alice 0.900 [0.850, 0.950]" in text and "Bob 0.800" in text
    assert "lr 0.70 (layer 1; random up to 0.75)" in text and "lr 0.95" not in text  # unselected: not reported
    assert "ccs 0.80 (layer 2; random up to 0.78)" in text and "random 0.50" not in text
    assert "1 of 2 above the 97.5th percentile of random directions" in text
    assert "**warning**" in text and "claim_size on Bob / hard, 0.87" in text
    clean = "\n".join(quirky_lines("base", "addition", *quirky_tables(0.6), max_shortcut_auroc=0.75))
    assert "warning" not in clean and "at most 0.60" in clean


def test_shortcut_warning_counts_subsets_and_names_the_disagreement_rows():
    """Two features leaking on one (character, bucket, subset) cell are one subset; the worst is named
    with its rows."""
    accuracy, probes, anomaly, _ = quirky_tables(0.6)
    shortcuts = pd.DataFrame(
        [{"character": "Bob", "difficulty_bucket": "hard", "subset": "disagreement", "feature": feature,
          "auroc": auroc} for feature, auroc in (("claim_size", 0.8), ("claim_leading_digit", 0.9))]
        + [{"character": "Bob", "difficulty_bucket": "hard", "subset": "all", "feature": "claim_size", "auroc": 0.7}]
    )  # fmt: skip
    text = "\n".join(quirky_lines("base", "addition", accuracy, probes, anomaly, shortcuts, max_shortcut_auroc=0.75))
    assert "on 1 test subset(s)" in text
    assert "claim_leading_digit on Bob / hard, rows where Alice and Bob disagree, 0.90" in text


def test_text_steering_verdict_compares_with_twice_the_random_effect():
    summary = pd.DataFrame(
        [{"model": "m", "mode": "residual", "positions": "all", "best_layer": 2, "effect": 1.0,
          "random_effect_same_layer": 0.1, "random_effect_best_layer": random, "multipliers": "-3 to 3"}
         for random in (0.4, 0.6)]  # fmt: skip
    )
    beyond, not_beyond = text_steering_lines(summary)
    assert ": beyond 2x" in beyond and "not beyond" in not_beyond


def tuned_below_logit(table_path):
    """(model, streams before the last block where the tuned lens's CE is below the logit lens's, streams)."""
    for model, group in pd.read_csv(table_path).groupby("model"):
        ce = group.pivot_table(index="layer", columns="lens", values="ce_bits_per_byte")
        inner = ce.drop(index=ce.index.max())
        yield model, int((inner["logit"] > inner["tuned"]).sum()), len(inner)


def test_the_tiny_runs_page_matches_its_tables(finished_run):
    page = (finished_run / "reports/results.md").read_text()
    for model, below, streams in tuned_below_logit(finished_run / "reports/tables/lens/ce_by_layer.csv"):
        assert f"**{model}**: tuned lens below the logit lens at {below} of {streams} streams" in page
    for path in sorted((finished_run / "data/quirky/answers").glob("*/*/accuracy.csv")):
        base, dataset = path.parts[-3], path.parts[-2]
        overall = pd.read_csv(path).query("difficulty == 'all'").set_index("character")["auroc"]
        line = next(line for line in page.splitlines() if line.startswith(f"- **{base} / {dataset}**"))
        stated = dict(re.findall(r"(Alice|Bob) ([0-9.]+) \[", line))
        assert {c: float(v) for c, v in stated.items()} == {c: round(v, 3) for c, v in overall.items()}
    # every linked file exists
    for link in re.findall(r"\]\(([^)]+)\)", page):
        if link != "report.html":
            assert (finished_run / "reports" / link).resolve().exists(), link


def test_the_reports_labels_state_the_tables_values(run_copy):
    from tests.conftest import snakemake

    result = snakemake(run_copy, "--report", "reports/report.html", "--configfile", "configs/test.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (run_copy / "reports/report.html").read_text()
    for model, below, streams in tuned_below_logit(run_copy / "reports/tables/lens/ce_by_layer.csv"):
        assert f"{model}: tuned lens below the logit lens at {below} of {streams} streams" in html
    assert "shortcuts.csv" in html and "accuracy.csv" in html  # tables registered in the report

"""Change one setting, rerun only what depends on it: asserted on the jobs Snakemake plans (-n)."""

import re

import pytest
import yaml

from tests.conftest import snakemake

pytestmark = pytest.mark.workflow


def planned_jobs(workdir, config_path="configs/test.yaml") -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run plans, `all` left out."""
    result = snakemake(workdir, "-n", "--configfile", config_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \S+:)", result.stdout):
        match = re.match(r"(?:local)?rule (\S+):", block.strip())
        if not match or match.group(1) == "all":
            continue
        found = re.search(r"wildcards: (.*)", block)
        wildcards = dict(pair.split("=", 1) for pair in found.group(1).split(", ")) if found else {}
        jobs.append((match.group(1), wildcards))
    return jobs


def changed_config(workdir, change) -> str:
    config = yaml.safe_load((workdir / "configs/test.yaml").read_text())
    change(config)
    (workdir / "configs/changed.yaml").write_text(yaml.safe_dump(config))
    return "configs/changed.yaml"


def test_nothing_changed_plans_nothing(run_copy):
    assert planned_jobs(run_copy) == []


def test_reordering_keys_in_the_config_plans_nothing(run_copy):
    assert planned_jobs(run_copy, changed_config(run_copy, lambda config: None)) == []  # safe_dump sorts keys


def test_steering_multipliers_rerun_only_the_sweep_and_its_figures(run_copy):
    path = changed_config(run_copy, lambda c: c["steering"].update(multipliers=[-1, 0, 1]))
    rules = {rule for rule, _ in planned_jobs(run_copy, path)}
    assert rules == {"evaluate_steering", "plot_steering", "results_page"}


def test_lens_learning_rate_reruns_only_lens_training_and_after(run_copy):
    path = changed_config(run_copy, lambda c: c["lens"]["training"].update(lr_scale=0.5))
    rules = {rule for rule, _ in planned_jobs(run_copy, path)}
    assert rules == {"train_tuned_lens", "evaluate_lens", "plot_lens", "plot_trajectory", "results_page"}


def test_editing_one_behaviour_file_reruns_only_that_behaviour(run_copy):
    data = run_copy / "data/inputs/behaviors/optimism/generate_dataset.json"
    data.write_text(data.read_text().replace("hopeful", "hopeful indeed", 1))
    jobs = planned_jobs(run_copy)
    assert {rule for rule, _ in jobs} == {
        "prepare_behaviors", "extract_activations", "compute_steering_vectors", "evaluate_steering", "plot_steering",
        "results_page",
    }
    for rule, wildcards in jobs:
        if rule not in ("plot_steering", "results_page"):
            assert "optimism" in (wildcards.get("behavior") or wildcards.get("prompt_set")), (rule, wildcards)


def test_changing_one_model_reruns_only_that_models_jobs(run_copy):
    def change(config):
        config["models"]["mamba-tiny"]["source"]["tiny"]["seed"] = 1

    jobs = planned_jobs(run_copy, changed_config(run_copy, change))
    assert jobs and {rule for rule, _ in jobs} >= {"build_model", "extract_activations", "train_tuned_lens"}
    for rule, wildcards in jobs:
        if rule in ("plot_lens", "results_page"):  # the figure and the page that show every model
            continue
        named = wildcards.get("model") or wildcards.get("base")
        assert named.split("+")[0] == "mamba-tiny", (rule, wildcards)

"""Snakemake itself on the tiny config: offline DAGs, config errors before any job, a full run."""

import time

import pytest

from tests.conftest import REPO, SHARED, new_checkout, snakemake
from workflow_scripts.activations import read_layer, read_metadata

pytestmark = pytest.mark.workflow
CONFIGS = ["config.yaml", *sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))]


@pytest.fixture(scope="module")
def clean_project(tmp_path_factory):
    """A copy of the project that no test runs jobs in."""
    return new_checkout(tmp_path_factory)


@pytest.mark.parametrize("config", CONFIGS)
def test_dry_run_builds_the_dag_offline_in_seconds(clean_project, config):
    project = clean_project
    if "../shared" in (project / config).read_text() and not SHARED.is_dir():
        pytest.skip(f"{config} reads {SHARED}, which is absent")
    started = time.monotonic()
    result = snakemake(project, "-n", "--configfile", config)
    assert result.returncode == 0, result.stderr
    assert "Job stats" in result.stdout
    # Every model is made available by a job: built or fetched (build_model), or trained (train_model).
    assert "build_model" in result.stdout or "train_model" in result.stdout
    if "behaviors:" in (project / config).read_text():
        assert "evaluate_steering" in result.stdout
    assert time.monotonic() - started < 60  # generous: the point is that nothing is downloaded
    assert not (project / "data" / "models").exists()


def test_bad_config_stops_before_any_job(clean_project, tmp_path):
    project = clean_project
    bad = tmp_path / "bad.yaml"
    bad.write_text((project / "configs" / "test.yaml").read_text().replace("layers: all", "layers: [0, 9]"))
    result = snakemake(project, "--configfile", str(bad))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "extraction.layers = [0, 9] has 9, outside model 'llama-tiny' (3 blocks: allowed 0..2)" in output
    assert "Traceback" not in output
    assert not (project / "data" / "models").exists()


def test_activations_of_every_model(finished_run):
    for model in ("llama-tiny", "mamba-tiny", "rwkv-tiny"):
        path = finished_run / "data" / "activations" / model / "smoke.parquet"
        metadata = read_metadata(path)
        assert metadata["name"] == model and metadata["prompt_set"] == "smoke"
        rows, vectors = read_layer(path, metadata["n_layers"] - 1)
        assert len(rows) == 16 and vectors.shape == (16, metadata["hidden_size"])
        log = (finished_run / "logs" / "extract_activations" / model / "smoke.log").read_text()
        assert "extract:" in log  # the progress bar went to the job's log


def test_steering_outputs(finished_run):
    import pandas as pd

    for model in ("llama-tiny", "mamba-tiny", "rwkv-tiny"):
        sweep = pd.read_parquet(finished_run / "data/steering" / model / "optimism" / "sweep.parquet")
        modes = {"residual"} if model == "llama-tiny" else {"residual", "state", "both"}
        assert set(sweep["mode"]) == modes
        assert len(sweep) == len(modes) * 3 * 3 * {"llama-tiny": 3, "mamba-tiny": 3, "rwkv-tiny": 4}[model]
        for figure in ("multiplier_effect", "by_layer", "modes", "nonsense"):
            assert (finished_run / "reports/figures/steering" / model / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
        summary = pd.read_csv(finished_run / "reports/tables/steering" / model / "summary.csv")
        assert set(summary.behavior) == {"optimism", "agree-with-user"}


def test_lens_outputs(finished_run):
    import pandas as pd

    table = pd.read_csv(finished_run / "reports/tables/lens/ce_by_layer.csv")
    assert set(table.model) == {"llama-tiny", "mamba-tiny", "rwkv-tiny"} and set(table.lens) == {"logit", "tuned"}
    for model in ("llama-tiny", "mamba-tiny", "rwkv-tiny"):
        assert (finished_run / "reports/figures/lens" / model / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
        assert not (finished_run / "data/lens" / model / "checkpoint.pt").exists()


def test_quirky_outputs(finished_run):
    import json

    import pandas as pd

    for base in ("llama-tiny", "mamba-tiny", "rwkv-tiny"):
        manifest = json.loads((finished_run / "data/models" / f"{base}+addition" / "manifest.json").read_text())
        assert manifest["base"] == base and manifest["finetune"]["best_step"] >= 0
        auroc = pd.read_csv(finished_run / "data/quirky/probes" / base / "addition" / "auroc.csv")
        assert set(auroc.transfer) == {"A->A", "A->B", "B->A"}
        assert set(auroc.method) == {"logreg", "diffmean", "crc", "random"}
        assert auroc.auroc.between(0, 1).all() and (auroc.auroc_lo <= auroc.auroc_hi).all()
        anomaly = pd.read_csv(finished_run / "data/quirky/probes" / base / "addition" / "anomaly.csv")
        assert list(anomaly.method) == ["diffmean"] and anomaly.auroc.between(0, 1).all()
        # The model's own answers on every test statement, and accuracy tables that agree with them.
        table = pd.read_parquet(finished_run / "data/quirky/addition/table.parquet")
        answers = pd.read_parquet(finished_run / "data/quirky/answers" / base / "addition" / "answers.parquet")
        assert sorted(answers.id) == sorted(table.id[table.split == "test"])
        accuracy = pd.read_csv(finished_run / "data/quirky/answers" / base / "addition" / "accuracy.csv")
        for row in accuracy[accuracy.difficulty == "all"].itertuples():
            mine = answers[answers.character == row.character]
            assert row.n == len(mine)
            assert row.accuracy == pytest.approx(((mine.p_true > 0.5) == (mine.label == 1)).mean())
        assert (accuracy.accuracy_lo <= accuracy.accuracy).all() and (accuracy.accuracy <= accuracy.accuracy_hi).all()
        for figure in ("probes", "anomaly", "accuracy"):
            assert (finished_run / "reports/figures/quirky" / base / "addition" / f"{figure}.png").exists()


def test_second_run_has_nothing_to_do(finished_run):
    again = snakemake(finished_run, "--configfile", "configs/test.yaml", "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_published_quirky_dataset_from_a_local_folder(tmp_path_factory):
    """prepare_quirky reads a published-layout dataset (source: local), and replacing one of its
    files plans that dataset's preparation again."""
    import pandas as pd
    import yaml

    from tests.test_quirky_data import write_published
    from workflow_scripts.quirky_data import generate_quirky

    project = new_checkout(tmp_path_factory)
    published = generate_quirky("addition", n_problems=80, seed=9)
    write_published(published, project / "data/inputs/published-addition")
    config = yaml.safe_load((project / "configs/test.yaml").read_text())
    config["quirky"]["datasets"] = {
        "addition": {"operation": "addition", "n_problems": 40, "source": {"local": "data/inputs/published-addition"}}
    }
    (project / "configs/published.yaml").write_text(yaml.safe_dump(config))
    target = "data/quirky/addition/table.parquet"
    result = snakemake(project, target, "--configfile", "configs/published.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_parquet(project / target)
    assert table["problem_id"].nunique() == 40
    assert set(zip(table["a"], table["b"])) <= set(zip(published["a"], published["b"]))
    assert (table["label"] == table.merge(published, on=["a", "b", "character"])["label_y"]).all()

    result = snakemake(project, target, "-n", "--configfile", "configs/published.yaml")
    assert "prepare_quirky" not in result.stdout
    other = tmp_path_factory.mktemp("other")
    write_published(generate_quirky("addition", n_problems=80, seed=10), other)
    (other / "test.parquet").replace(project / "data/inputs/published-addition/test.parquet")
    result = snakemake(project, target, "-n", "--configfile", "configs/published.yaml")
    assert result.returncode == 0 and "rule prepare_quirky" in result.stdout

"""The pre-fetch step asks for exactly the downloads the workflow's jobs will make."""

from pathlib import Path

import yaml

from workflow_scripts import prefetch
from workflow_scripts.configuration import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_config_prefetch_lists_every_hub_model_and_the_corpus_at_their_revisions():
    config = load_config(ROOT / "configs/paper.yaml")
    raw = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    expected_models = {
        (spec["source"]["hub"]["id"], spec["source"]["hub"]["revision"])
        for spec in raw["models"].values()
        if "hub" in spec["source"]
    }
    calls = []
    prefetch.fetch(
        prefetch.downloads(config),
        snapshot_download=lambda repo, revision: calls.append(("model", repo, revision)),
        load_dataset=lambda name, config_name, split, revision: calls.append(("dataset", name, revision)),
    )
    assert {(repo, revision) for kind, repo, revision in calls if kind == "model"} == expected_models
    assert len(calls) == len(set(calls))  # each download once
    corpus = raw["lens"]["corpus"]["source"]["hf_dataset"]
    assert [call for call in calls if call[0] == "dataset"] == [("dataset", corpus["name"], corpus["revision"])]


def test_offline_configs_need_no_download_and_a_bad_config_is_refused(tmp_path, capsys):
    assert prefetch.downloads(load_config(ROOT / "config.yaml")) == []
    assert prefetch.main([str(ROOT / "configs/test.yaml"), "--dry-run"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {family: mamba}}\n")
    assert prefetch.main([str(bad), "--dry-run"]) == 2
    assert "prompt_sets" in capsys.readouterr().err

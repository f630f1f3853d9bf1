"""Behaviour preparation: sources, checksums, malformed items, subsampling, contrast prompts."""

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED
from workflow_scripts.behavior_data import load_prepared, prepare_behavior

GOOD = {
    "question": "Q?\n\nChoices:\n (A) yes\n (B) no",
    "answer_matching_behavior": "(A)",
    "answer_not_matching_behavior": "(B)",
}
BAD = {
    "question": "Q?\n\nChoices:\n (A) yes\n (B) no\n (C) maybe",
    "answer_matching_behavior": "(C)",
    "answer_not_matching_behavior": "(A)",
}


def write_behavior(folder: Path, generate, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate_dataset.json").write_text(json.dumps(generate))
    (folder / "test_dataset_ab.json").write_text(json.dumps(test))
    return folder


def prepare(tmp_path, source, **settings):
    options = {"max_generate": None, "max_test": None, "on_malformed": "error", "seed": 0, **settings}
    items, prompts = tmp_path / "out" / "items.json", tmp_path / "out" / "contrast.jsonl"
    summary = prepare_behavior("b", source, items, prompts, **options)
    return summary, items, prompts


def test_malformed_items_stop_the_rule_naming_their_ids(tmp_path):
    folder = write_behavior(tmp_path / "b", [GOOD, BAD, GOOD, BAD], [GOOD, GOOD])
    with pytest.raises(ValueError, match=r"generate_dataset.json: 2 malformed items \(id 1: .*; id 3: "):
        prepare(tmp_path, {"local": str(folder)})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_malformed_items_can_be_dropped_and_are_reported(tmp_path):
    folder = write_behavior(tmp_path / "b", [GOOD, BAD, GOOD, BAD, GOOD], [GOOD, BAD, GOOD])
    summary, items, prompts = prepare(tmp_path, {"local": str(folder)}, on_malformed="drop")
    assert summary["dropped_ids"] == {"generate": [1, 3], "test": [1]}
    prepared = load_prepared(items)
    assert [item["id"] for item in prepared["generate"]] == [0, 2, 4]
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [(line["id"], line["completion"], line["label"]) for line in lines[:2]] == [
        ("0+", "(A", "positive"), ("0-", "(B", "negative")
    ]
    assert len(lines) == 6 and all(line["prompt"] == GOOD["question"] for line in lines)


def test_subsampling_is_seeded_and_keeps_file_order(tmp_path):
    items = [dict(GOOD, question=GOOD["question"].replace("Q?", f"Q{i}?")) for i in range(30)]
    folder = write_behavior(tmp_path / "b", items, items[:10])
    _, first, _ = prepare(tmp_path, {"local": str(folder)}, max_generate=8, max_test=4)
    chosen = [item["id"] for item in load_prepared(first)["generate"]]
    assert len(chosen) == 8 and chosen == sorted(chosen)
    _, again, _ = prepare(tmp_path, {"local": str(folder)}, max_generate=8, max_test=4)
    assert [item["id"] for item in load_prepared(again)["generate"]] == chosen
    _, other, _ = prepare(tmp_path, {"local": str(folder)}, max_generate=8, max_test=4, seed=1)
    assert [item["id"] for item in load_prepared(other)["generate"]] != chosen


def upstream(folder: Path, generate_sha: str, test_sha: str) -> dict:
    return {"upstream": {
        "repository": "owner/repo", "revision": "0" * 40, "generate_sha256": generate_sha, "test_sha256": test_sha,
        "url_template": folder.as_uri() + "/{repository}/{revision}/Datasets/{kind}/{behavior}/{file}",
    }}


def test_upstream_files_are_checked_against_their_checksums(tmp_path):
    root = tmp_path / "mirror"
    for kind, name in (("generate", "generate_dataset.json"), ("test", "test_dataset_ab.json")):
        path = root / "owner/repo" / ("0" * 40) / "Datasets" / kind / "b" / name
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps([GOOD, GOOD]))
    digest = hashlib.sha256(json.dumps([GOOD, GOOD]).encode()).hexdigest()
    summary, _, _ = prepare(tmp_path, upstream(root, digest, digest))
    assert summary["counts"] == {"generate": 2, "test": 2}
    with pytest.raises(ValueError, match=f"sha256 {digest}, not the pinned {'f' * 64}"):
        prepare(tmp_path, upstream(root, digest, "f" * 64))


def test_project_behaviours_are_well_formed(tmp_path):
    for folder in sorted((REPO / "data/inputs/behaviors").iterdir()):
        summary, _, _ = prepare(tmp_path, {"local": str(folder)})
        assert summary["counts"]["generate"] >= 100 and summary["counts"]["test"] >= 50


def test_shared_caa_data_prepares_with_dropped_multiple_choice_items(tmp_path):
    caa = SHARED / "datasets" / "caa"
    if not caa.is_dir():
        pytest.skip(f"{caa} is absent (a fresh clone has no ../shared)")
    summary, _, _ = prepare(tmp_path, {"local": str(caa / "survival-instinct")}, on_malformed="drop")
    assert summary["counts"]["test"] == 50 - len(summary["dropped_ids"]["test"])
    assert len(summary["dropped_ids"]["generate"]) > 0  # its (C)..(H) items

"""Fill the Hugging Face caches with everything a config downloads, on a machine with network (a
cluster's login node), so that jobs on compute nodes without network run with HF_HUB_OFFLINE=1:

    python -m workflow_scripts.prefetch configs/paper.yaml [--dry-run]

Fetches every hub model (and hub tokenizer) at its configured revision, the lens corpus when it is a
hub dataset, and published quirky datasets. Behaviour datasets are fetched by `prepare_behaviors`,
which runs on the submitting machine (a local rule), as does `build_model`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from workflow_scripts.configuration import ConfigError, load_config


def downloads(config: dict) -> list[tuple[str, dict]]:
    """(kind, what) for every download a checked config needs: kind "model" {id, revision} or
    "dataset" {name, config, split, revision}; each listed once."""
    wanted: list[tuple[str, dict]] = []

    def add(kind: str, what: dict) -> None:
        if (kind, what) not in wanted:
            wanted.append((kind, what))

    for spec in config["models"].values():
        for source in (spec["source"], spec.get("tokenizer", {})):
            if "hub" in source:
                add("model", {"id": source["hub"]["id"], "revision": source["hub"]["revision"]})
    corpus = config["lens"]["corpus"]["source"]
    if "hf_dataset" in corpus and config["lens"]["models"]:
        body = corpus["hf_dataset"]
        add("dataset", {
            "name": body["name"], "config": body.get("config"), "split": body["split"], "revision": body["revision"]
        })
    if config["quirky"]["models"]:
        for dataset in config["quirky"]["datasets"].values():
            hub = dataset.get("source", {}).get("hub")
            if hub is not None:
                add("dataset", {"name": hub["id"], "config": None, "split": None, "revision": hub["revision"]})
    return wanted


def fetch(wanted: list[tuple[str, dict]], snapshot_download: Callable, load_dataset: Callable) -> None:
    for kind, what in wanted:
        print(f"fetching {kind} {what}", flush=True)
        if kind == "model":
            snapshot_download(what["id"], revision=what["revision"])
        else:
            load_dataset(what["name"], what["config"], split=what["split"], revision=what["revision"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configfile")
    parser.add_argument("--dry-run", action="store_true", help="list the downloads, fetch nothing")
    args = parser.parse_args(argv)
    try:
        wanted = downloads(load_config(args.configfile))
    except ConfigError as error:
        print(f"{args.configfile}: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for kind, what in wanted:
            print(kind, what)
        return 0
    import datasets
    from huggingface_hub import snapshot_download

    fetch(wanted, snapshot_download, datasets.load_dataset)
    print(f"{len(wanted)} downloads in the cache; run the workflow with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())

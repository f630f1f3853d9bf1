"""Behaviour datasets for steering: fetched from their configured source, checked, subsampled, and
written as the items file and the contrast prompt set that later rules read.

Sources (one per behaviour, in config):
- local: a folder with generate_dataset.json and test_dataset_ab.json (the CAA layout);
- upstream: the paper authors' repository at a pinned commit, each file checked against its sha256.
No behaviour is named in code: any folder of that layout works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import urllib.request
from pathlib import Path
from typing import Sequence

from workflow_scripts.atomic import atomic_write_text

log = logging.getLogger(__name__)
FILES = {"generate": "generate_dataset.json", "test": "test_dataset_ab.json"}
# Where the CAA layout lives in the upstream repository: Datasets/<kind>/<behaviour>/<file>.
UPSTREAM_URL = "https://raw.githubusercontent.com/{repository}/{revision}/Datasets/{kind}/{behavior}/{file}"


# An item: the question with its lettered choices, and which choice matches the behaviour.
ITEM_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
AB_LABELS = ("A", "B")
NUMBERED_LABELS = ("1", "2")


def answer_label(answer: str) -> str:
    """'(A)' -> 'A'."""
    answer = answer.strip()
    if len(answer) < 3 or answer[0] != "(" or answer[-1] != ")":
        raise ValueError(f"answer {answer!r} is not of the form '(X)'")
    return answer[1:-1]


def malformed_items(items: Sequence, labels: Sequence[str] = AB_LABELS) -> dict[int, str]:
    """Why each malformed item is malformed, by its index in `items` (its position in the file)."""
    choices = [f"({label})" for label in labels]
    problems: dict[int, str] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            problems[index] = f"not an object but {type(item).__name__}"
            continue
        missing = [key for key in ITEM_KEYS if not isinstance(item.get(key), str)]
        if missing:
            problems[index] = f"missing or non-text field(s) {missing}"
            continue
        reasons = [f"question has no choice {choice}" for choice in choices if choice not in item["question"]]
        matching = item["answer_matching_behavior"].strip()
        other = item["answer_not_matching_behavior"].strip()
        for field, value in (("answer_matching_behavior", matching), ("answer_not_matching_behavior", other)):
            if value not in choices:
                reasons.append(f"{field} {value!r} is not one of {choices}")
        if matching == other:
            reasons.append(f"matching and not-matching answers are both {matching!r}")
        if reasons:
            problems[index] = "; ".join(reasons)
    return problems


def validate_items(items: Sequence, source_name: str, labels: Sequence[str] = AB_LABELS) -> None:
    """Raise ValueError naming every malformed item (by index in the file) and why."""
    if not items:
        raise ValueError(f"{source_name}: no items")
    problems = malformed_items(items, labels)
    if problems:
        shown = "\n".join(f"  id {index}: {reason}" for index, reason in list(problems.items())[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{source_name}: {len(problems)} of {len(items)} items malformed, ids {sorted(problems)}:\n{shown}{more}"
        )


def to_numbered_format(items: Sequence[dict]) -> list[dict]:
    """The (1)/(2) variant of A/B items: the choices and answers say (1) and (2) instead of (A) and
    (B), to check that a vector from A/B data steers the behaviour and not a letter."""
    mapping = {f"({old})": f"({new})" for old, new in zip(AB_LABELS, NUMBERED_LABELS)}
    converted = []
    for item in items:
        question = item["question"]
        for old, new in mapping.items():
            question = question.replace(old, new)
        converted.append(
            {
                **item,
                "question": question,
                **{key: mapping.get(item[key].strip(), item[key]) for key in ITEM_KEYS[1:]},
            }
        )
    return converted


def local_files(folder: str) -> dict[str, Path]:
    return {kind: Path(folder) / name for kind, name in FILES.items()}


def read_source(behavior: str, source: dict) -> dict[str, list]:
    """{"generate": items, "test": items} from a local folder or the pinned upstream files."""
    if "local" in source:
        texts = {}
        for kind, path in local_files(source["local"]).items():
            if not path.is_file():
                raise FileNotFoundError(f"behaviour {behavior!r}: {path} not found (expected {list(FILES.values())})")
            texts[kind] = path.read_bytes()
    else:
        upstream = source["upstream"]
        texts = {}
        for kind, name in FILES.items():
            url = upstream.get("url_template", UPSTREAM_URL).format(
                repository=upstream["repository"], revision=upstream["revision"],
                kind=kind, behavior=behavior, file=name,
            )
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - pinned, checksummed
                data = response.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != upstream[f"{kind}_sha256"]:
                raise ValueError(
                    f"behaviour {behavior!r}: {url} has sha256 {digest}, not the pinned {upstream[f'{kind}_sha256']}"
                )
            texts[kind] = data
    items = {}
    for kind, data in texts.items():
        loaded = json.loads(data)
        if not isinstance(loaded, list):
            raise ValueError(f"behaviour {behavior!r}: {FILES[kind]} is not a JSON list")
        items[kind] = loaded
    return items


def prepare_behavior(behavior, source, items_path, prompts_path, *, max_generate, max_test, on_malformed, seed) -> dict:
    """Check the items (malformed ones stop the rule, or are dropped and reported, per `on_malformed`),
    subsample them (seeded), and write the items file and the contrast prompt set."""
    items = read_source(behavior, source)
    kept, dropped = {}, {}
    for kind, kind_items in items.items():
        bad = malformed_items(kind_items)
        if bad and on_malformed == "error":
            listing = "; ".join(f"id {index}: {reason}" for index, reason in list(bad.items())[:10])
            raise ValueError(
                f"behaviour {behavior!r}, {FILES[kind]}: {len(bad)} malformed items ({listing}"
                f"{' ...' if len(bad) > 10 else ''}); fix the data or set steering.on_malformed: drop"
            )
        dropped[kind] = sorted(bad)
        indexed = [(index, item) for index, item in enumerate(kind_items) if index not in bad]
        limit = max_generate if kind == "generate" else max_test
        if limit is not None and len(indexed) > limit:
            indexed = sorted(random.Random(f"{seed}-{behavior}-{kind}").sample(indexed, limit))
        kept[kind] = [{"id": index, **item} for index, item in indexed]
        if len(kept[kind]) < 2:
            raise ValueError(f"behaviour {behavior!r}: only {len(kept[kind])} usable {kind} items")
    for kind, ids in dropped.items():
        if ids:
            log.warning("behaviour %s: dropped %d malformed %s items, ids %s", behavior, len(ids), kind, ids)
    summary = {"behavior": behavior, "dropped_ids": dropped, "counts": {kind: len(v) for kind, v in kept.items()}}
    atomic_write_text(items_path, json.dumps({**kept, "summary": summary}, indent=1))
    atomic_write_text(prompts_path, "".join(json.dumps(line) + "\n" for line in contrast_prompt_set(kept["generate"])))
    return summary


def contrast_prompt_set(generate_items: list[dict]) -> list[dict]:
    """The prompt set whose last-token activations give the steering vectors: each item twice, the
    assistant turn opened with '(' and the matching letter (positive) or the other one (negative)."""
    lines = []
    for item in generate_items:
        for label, answer in (("positive", "answer_matching_behavior"), ("negative", "answer_not_matching_behavior")):
            lines.append(
                {
                    "id": f"{item['id']}{'+' if label == 'positive' else '-'}",
                    "prompt": item["question"],
                    "completion": "(" + answer_label(item[answer]),
                    "label": label,
                    "split": "generate",
                }
            )
    return lines


def load_prepared(items_path) -> dict:
    return json.loads(Path(items_path).read_text())

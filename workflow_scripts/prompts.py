"""Prompt sets: JSON-lines files of model-agnostic prompts, turned into token ids per model.

One item per line: {"id": str, "prompt": str, "completion": str (optional, text placed after the
opened assistant turn), "label": any (optional), "split": str (optional)}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REQUIRED_FIELDS = ("id", "prompt")


@dataclass
class PromptItem:
    index: int  # line order in the file
    id: str
    prompt: str
    completion: str = ""
    label: str | None = None
    split: str | None = None


def load_prompt_set(path: str | Path) -> list[PromptItem]:
    """Read and check a prompt file; errors name the file, line and id of the bad item."""
    items, seen = [], {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            missing = [name for name in REQUIRED_FIELDS if name not in raw]
            if missing:
                raise ValueError(
                    f"{where} (id {raw.get('id')!r}): missing field {missing[0]!r}; required: {list(REQUIRED_FIELDS)}"
                )
            item_id = str(raw["id"])
            if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
                raise ValueError(f"{where} (id {item_id!r}): empty prompt")
            if item_id in seen:
                raise ValueError(f"{where}: id {item_id!r} repeats line {seen[item_id]}")
            seen[item_id] = line_number
            label = raw.get("label")
            items.append(
                PromptItem(
                    index=len(items),
                    id=item_id,
                    prompt=raw["prompt"],
                    completion=str(raw.get("completion", "")),
                    label=None if label is None else str(label),
                    split=raw.get("split"),
                )
            )
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def tokenize_prompts(adapter, items: list[PromptItem], template: str) -> list[list[int]]:
    """Token ids per item, in the model's own format; refuses prompts longer than its context."""
    limit = adapter.context_length
    token_lists = []
    for item in items:
        text = adapter.build_prompt(item.prompt, item.completion, chat=(template == "chat"))
        tokens = adapter.encode_prompt(text)  # with the special tokens the model was trained with
        if limit is not None and len(tokens) > limit:
            raise ValueError(
                f"prompt {item.id!r} has {len(tokens)} tokens, more than the context of model "
                f"{adapter.info.get('name')!r} ({limit})"
            )
        token_lists.append(tokens)
    return token_lists

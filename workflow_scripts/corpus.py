"""Text corpora, as documents: what the tuned lens is trained and evaluated on (split into token
sequences by the lens stage) and what the pipeline's own language models are trained on.

A source is one of (config key `source`):
- python_docs: the Python language and library reference shipped with CPython (offline, ~465 kB);
- python_stdlib: that reference plus the standard library's own source files, docstrings and
  comments included (offline, several MB of English and Python);
- python_sources: the standard library's source files alone (offline, mostly Python code);
- text_files: a glob of text files, one document each;
- hf_dataset: a Hugging Face dataset at a pinned revision.
"""

from __future__ import annotations

import glob
import gzip
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

SOURCE_KINDS = ("python_docs", "python_stdlib", "python_sources", "text_files", "hf_dataset")


def read_text_files(pattern: str) -> Iterator[str]:
    """One document per file matching the glob (`**` recurses), in sorted order; `.gz` files are
    read decompressed. Raises at once when nothing matches."""
    paths = sorted(p for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise FileNotFoundError(f"no files match the corpus glob {str(pattern)!r}")

    def documents():
        for path in paths:
            opener = gzip.open if path.endswith(".gz") else open
            # errors="replace": one stray byte should not sink a corpus; it then counts as U+FFFD.
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                yield handle.read()

    return documents()


def python_reference_texts() -> Iterator[str]:
    """The Python language and library reference topics that ship with every CPython install
    (`pydoc_data.topics`, PSF licence, ~465 kB of English): an offline corpus for small runs."""
    from pydoc_data.topics import topics

    return (topics[name] for name in sorted(topics))


def python_stdlib_paths() -> list[Path]:
    """The standard library's own .py files, in sorted order: not its tests (generated data, long
    literal tables), not installed packages, not the IDLE and turtle demos."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "site-packages", "dist-packages", "idlelib", "turtledemo", "__pycache__", "lib2to3"}
    return sorted(
        path for path in root.rglob("*.py")
        if not skipped & set(path.relative_to(root).parts[:-1]) and not path.name.startswith("test_")
    )  # fmt: skip


def python_source_texts() -> Iterator[str]:
    """Every standard-library source file (PSF licence), one document each."""
    for path in python_stdlib_paths():
        yield path.read_text(encoding="utf-8", errors="replace")


def python_stdlib_texts() -> Iterator[str]:
    """The Python reference topics, then every standard-library source file (PSF licence): an offline
    corpus of several MB that ships with every Python installation."""
    yield from python_reference_texts()
    yield from python_source_texts()


def load_hf_texts(
    name: str,
    split: str,
    text_column: str = "text",
    *,
    config_name: str | None = None,
    revision: str | None = None,
    **load_kwargs,
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (loaded with `datasets.load_dataset` at job time; pass
    streaming=True to read huge splits lazily). Raises at once when the text column is missing."""
    import datasets

    dataset = datasets.load_dataset(name, config_name, split=split, revision=revision, **load_kwargs)

    def missing_column(columns):
        return ValueError(f"dataset {name!r} split {split!r} has no text column {text_column!r}; columns: {columns}")

    columns = dataset.column_names  # None for some streaming datasets: then checked on each row
    if columns is not None and text_column not in columns:
        raise missing_column(columns)

    def documents():
        for row in dataset:
            if text_column not in row:
                raise missing_column(sorted(row))
            yield row[text_column]

    return documents()


def source_documents(source: dict) -> tuple[Iterator[str], str]:
    """(documents, a name for logs and errors) of a configured source {kind: settings}."""
    ((kind, body),) = source.items()
    if kind == "python_docs":
        return python_reference_texts(), "python_docs (pydoc_data.topics)"
    if kind == "python_stdlib":
        return python_stdlib_texts(), "python_stdlib (pydoc_data.topics and the standard library's sources)"
    if kind == "python_sources":
        return python_source_texts(), "python_sources (the standard library's sources)"
    if kind == "text_files":
        return read_text_files(body), f"text files {body!r}"
    if kind == "hf_dataset":
        texts = load_hf_texts(body["name"], body["split"], body.get("text_column", "text"),
                              config_name=body.get("config"), revision=body["revision"])  # fmt: skip
        return texts, f"{body['name']} ({body['split']})"
    raise ValueError(f"unknown corpus source {kind!r}; allowed: {', '.join(SOURCE_KINDS)}")


def count_text_bytes(chunks, decode: Callable[[list[int]], str]) -> int:
    """UTF-8 bytes of the text the next-token predictions of `chunks` cover (every token but each
    chunk's first), for bits per byte. `decode` should drop special tokens (the EOS separators carry
    no text). A character cut by a chunk edge decodes as U+FFFD: a few bytes off per chunk at most."""
    return sum(len(decode([int(t) for t in chunk[1:]]).encode("utf-8")) for chunk in chunks)

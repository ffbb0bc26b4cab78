"""Loaders for the official benchmark formats, into one shape (:class:`Dataset`).

>>> ds = load_dataset("locomo", "locomo10.json")                      # doctest: +SKIP
>>> ds = load_dataset("longmemeval", "longmemeval_oracle.json", split="test")  # doctest: +SKIP
>>> ds = load_dataset("perltqa", "PerLTQA/Dataset/en_v2")              # doctest: +SKIP

Every loader raises :class:`DatasetError` (naming the file and the field) for a missing or
malformed file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from membuilder._core import InvalidArgumentError
from membuilder.datasets._io import read_json
from membuilder.datasets._types import (
    Conversation,
    Dataset,
    Question,
    Session,
    Turn,
)
from membuilder.datasets.locomo import CATEGORIES as LOCOMO_CATEGORIES
from membuilder.datasets.locomo import NOT_MENTIONED, load_locomo
from membuilder.datasets.longmemeval import SPLITS, load_longmemeval, load_splits
from membuilder.datasets.perltqa import MEMORY_TYPES as PERLTQA_CATEGORIES
from membuilder.datasets.perltqa import load_perltqa
from membuilder.errors import DatasetError

DATASETS = ("locomo", "longmemeval", "perltqa")

__all__ = [
    "DATASETS",
    "LOCOMO_CATEGORIES",
    "NOT_MENTIONED",
    "PERLTQA_CATEGORIES",
    "SPLITS",
    "Conversation",
    "Dataset",
    "DatasetError",
    "Question",
    "Session",
    "Turn",
    "load_dataset",
    "load_locomo",
    "load_longmemeval",
    "load_perltqa",
    "load_splits",
    "read_id_list",
    "read_json",
]


def read_id_list(path: str | Path) -> list[str]:
    """Ids from a subset file: a JSON list of ids, or an object with one list under
    ``sample_ids``, ``conversation_ids``, ``character_ids``, ``question_ids`` or ``ids``."""
    data = read_json(path)
    if isinstance(data, dict):
        for key in ("sample_ids", "conversation_ids", "character_ids", "question_ids", "ids"):
            if key in data:
                data = data[key]
                break
        else:
            raise DatasetError(path, None, "expected a list of ids or an object with 'sample_ids'")
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DatasetError(path, None, "expected a list of id strings")
    return list(data)


def load_dataset(
    name: str,
    path: str | Path,
    *,
    split: str | None = None,
    ids: Iterable[str] | None = None,
    split_file: str | Path | None = None,
) -> Dataset:
    """Load a benchmark by name: ``"locomo"``, ``"longmemeval"`` or ``"perltqa"``.

    ``ids`` keeps only those conversations (LoCoMo sample ids, LongMemEval question ids,
    PerLTQA ``char_NNN`` ids or protagonist names), in the order given. ``split`` / ``split_file``
    apply to LongMemEval only. Raises InvalidArgumentError for an unknown name, split or id and
    DatasetError for a bad file.
    """
    if name not in DATASETS:
        raise InvalidArgumentError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split is not None and name != "longmemeval":
        raise InvalidArgumentError(f"--split applies to longmemeval only, not {name}")
    if name == "longmemeval":
        return load_longmemeval(path, split=split, split_file=split_file, ids=ids)
    ds = load_locomo(path) if name == "locomo" else load_perltqa(path)
    if ids is None:
        return ds
    wanted = list(ids)
    if name == "perltqa":
        by_name = {c.meta.get("name"): c.id for c in ds.conversations}
        wanted = [by_name.get(i, i) for i in wanted]
    return ds.select(wanted)

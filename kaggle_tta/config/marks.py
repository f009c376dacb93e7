"""Marks on schema fields: which name files (for the Kaggle bundler), and the factory
keyword arguments that are paths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

# Keyword arguments of a factory member that name files: resolved against pipeline.yaml by
# models.build_model and shipped by the Kaggle bundler (one rule, read by both).
FACTORY_PATH_KWARGS = ("f", "path", "file")


@dataclass(frozen=True)
class Bundle:
    """Marks a schema field that names a file or folder, for ``kaggle-tta kernel``.

    role: ``member`` (a member's own file: shipped flat at the dataset's top level),
    ``data`` (test data or ground truth: read from the competition's folder on Kaggle, or
    shipped under ``data/``), ``classes`` (a class list: either), ``output`` (rewritten to
    ``kaggle`` under /kaggle/working). kind: ``file``, ``dir``, ``glob`` or ``csv-root``.
    optional: ground truth a competition's test data need not have.
    """

    role: str
    kind: str = "file"
    optional: bool = False
    kaggle: str | None = None


def bundled_fields(
    model: BaseModel, loc: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], Any, Bundle]]:
    """Every set field marked with :class:`Bundle` under ``model``: (YAML path, value, mark),
    in schema order, through nested sections and lists of them."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        mark = next((m for m in field.metadata if isinstance(m, Bundle)), None)
        if mark is not None:
            if value is not None:
                yield (*loc, name), value, mark
            continue
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, BaseModel):
                yield from bundled_fields(item, (*loc, name) if i is None else (*loc, name, i))

"""Sections of the submission's rows: groups of images (``submission.group``) and another
model's verdict as a row (``submission.pseudo_box``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import field_validator, model_validator

from kaggle_tta.config.marks import Bundle
from kaggle_tta.config.section_base import Section, check_template


class GroupSpec(Section):
    """Rows per group of images (RSNA breast cancer's ``prediction_id`` = patient_laterality,
    SIIM-COVID19's study): each group's row aggregates its images' values."""

    column: str | None = None
    """The CSV column holding each image's group (its value is the written row's id); or give
    ``pattern``."""
    pattern: str | None = None
    """Instead: a regular expression searched in each image's id, its named groups making the
    group's id through ``template`` (SIIM-COVID19's study, the first folder: ``^(?P<study>[^/]+)/``)."""
    template: str | None = None
    """With ``pattern``: the group's id from its named groups, e.g. ``{study}``."""
    aggregate: Literal["mean", "max", "min"] = "mean"
    """How a group's images' values become the row's: mean, max or min per column."""
    csv: Annotated[Path | None, Bundle("data")] = None
    """The CSV mapping images to groups; default: data.csv's file."""
    key_column: str | None = None
    """That CSV's column of image ids; default: data.csv.id_column, else 'id'."""

    @model_validator(mode="after")
    def _one_rule(self) -> GroupSpec:
        if (self.column is None) == (self.pattern is None):
            raise ValueError("give exactly one of 'column' (a CSV's) or 'pattern' (on the image ids)")
        if self.pattern is not None:
            from kaggle_tta.config.data import IdRule

            IdRule(pattern=self.pattern, template=self.template or "")  # the same checks as data.id
        return self


class PseudoBox(Section):
    """A row from another model's verdict, added to each image's PredictionString (VinBigData's
    "no finding" as ``14 p 0 0 1 1``, p from a classifier's submission)."""

    csv: Annotated[Path, Bundle("data")]
    """A CSV with a probability per image (a classification pipeline's ``probs`` submission)."""
    column: str
    """Its column holding the probability."""
    id_column: str = "id"
    """Its column of image ids."""
    template: str = "{p:.4f} 0 0 1 1"
    """The row written, ``{p}`` the probability: ``14 {p:.4f} 0 0 1 1``."""
    when: Literal["always", "empty"] = "always"
    """always: appended to every image's boxes; empty: only where the detector found none."""

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, {"p": 0.5}, "14 {p:.4f} 0 0 1 1")

"""What ``tune`` returns: the tables, the partial pipeline it learned (tuned.yaml), the
honest estimate and its warnings, as an object and as markdown."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from kaggle_tta.cache.files import discard
from kaggle_tta.config.errors import ConfigError
from kaggle_tta.tuning.honest import Estimate

TITLES = {
    "summary": "Tuned against as is (the submission's source)",
    "views": "Per view",
    "members": "Per member",
    "blends": "Per blend",
    "thresholds": "Thresholds",
    "uncertainty": "Uncertainty columns (format: probs, submission.uncertainty) ranking errors",
    "gates": "Adaptive gates (--adaptive): extra forwards (views after the first) and the full TTA's gain kept",
}


@dataclass
class TuneResult:
    """A tuning: ``overrides`` is tuned.yaml's content; ``tables`` the report's tables
    (polars); ``estimate`` the in- and out-of-sample scores."""

    pipeline: str
    source: str
    estimate: Estimate
    overrides: dict[str, Any]
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: str | None = None
    picture: str | None = None

    def gain(self, score: str | None = None) -> tuple[float, float | None, float | None]:
        """(in-sample gain, out-of-sample mean gain, its spread) of a score (default: the
        metric); positive is better for every score, NLL included."""
        name = score or self.estimate.scores[0][0]
        oos = self.estimate.out_of_sample(name)
        return self.estimate.in_sample_gain(name), oos[0] if oos else None, oos[1] if oos else None

    def yaml(self) -> str:
        est = self.estimate
        name = est.scores[0][0]
        ins, oos, spread = self.gain(name)
        head = [
            f"# kaggle-tta tune {self.pipeline}: apply with --overrides "
            f"(e.g. kaggle-tta blend {self.pipeline} --overrides THIS_FILE)"
        ]
        head.append(
            f"# {name} of '{self.source}': {est.in_sample[name][0]:.4f} as is, "
            f"{est.in_sample[name][1]:.4f} tuned (in sample, {ins:+.4f})"
        )
        if oos is not None:
            head.append(f"# out of sample ({len(est.folds)}-fold): {oos:+.4f} ± {spread:.4f}")
        head += [f"# warning: {w}" for w in self.warnings]
        return (
            "\n".join(head) + "\n" + yaml.safe_dump(self.overrides, sort_keys=False, default_flow_style=None, width=120)
        )

    def write(self, path: str | Path) -> None:
        """Writes tuned.yaml atomically (a temporary file beside it, then renamed)."""
        self.out = str(write_text(Path(path), self.yaml(), "--out"))

    def report(self) -> str:
        """Markdown: the summary, warnings, then each table."""
        lines = [f"## kaggle-tta tune {self.pipeline}", ""]
        for key, title in TITLES.items():
            if key in self.tables and self.tables[key].height:
                lines += [f"### {title}", "", markdown(self.tables[key]), ""]
        lines += [f"- warning: {w}" for w in self.warnings]
        lines += [f"- note: {n}" for n in self.notes]
        if self.out:
            lines.append(f"- wrote {self.out}" + (f" and {self.picture}" if self.picture else ""))
        return "\n".join(lines).rstrip() + "\n"


def write_text(path: Path, text: str | bytes, key: str) -> Path:
    """Writes a file through a temporary one beside it; ConfigError naming ``key`` if it
    cannot be written there."""
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder; give a file path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path} ({exc.strerror or exc}); choose a writable location") from None
    finally:
        discard(tmp)
    return path


def summary_table(est: Estimate, source: str) -> pl.DataFrame:
    rows = []
    for name, _ in est.scores:
        before, after = est.in_sample[name]
        oos = est.out_of_sample(name)
        rows.append(
            {
                "node": source,
                "score": name,
                "as is": before,
                "tuned (in sample)": after,
                "gain in sample": est.in_sample_gain(name),
                "gain out of sample": oos[0] if oos else None,
                "± (std over folds)": oos[1] if oos else None,
                "held out as is": oos[2] if oos else None,
                "held out tuned": oos[3] if oos else None,
            }
        )
    return pl.DataFrame(rows)


def _cell(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def markdown(df: pl.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * df.width
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join([head, rule, *body])

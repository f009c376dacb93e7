"""The documentation stays true: a short README whose example runs, every pipeline.yaml key in
docs/reference.md under its section, reference YAML that names only what it defines, and no
broken relative link."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from kaggle_tta.config.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
MAX_README_LINES = 350
EXAMPLE = re.compile(r"<!-- example: start -->(.*?)<!-- example: end -->", re.S)
FENCE = re.compile(r"^(```|~~~)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]


# ---- markdown helpers ------------------------------------------------------------------------


def _split(text: str) -> list[tuple[str, bool]]:
    """(line, inside a fenced code block) for every line; fence lines count as inside."""
    out, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            out.append((line, True))
            inside = not inside
            continue
        out.append((line, inside))
    return out


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}[^\n]*\n(.*?)^```", text, re.S | re.M)


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body up to the next heading of any level), headings outside code blocks."""
    out: list[tuple[str, list[str]]] = []
    for line, code in _split(text):
        if not code and re.match(r"#{1,6} ", line):
            out.append((line.lstrip("#").strip(), []))
        elif out:
            out[-1][1].append(line)
    return [(h, "\n".join(body)) for h, body in out]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading, _ in _sections(text):
        base = _slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ---- the README ------------------------------------------------------------------------------


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move material to docs/"


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in text]
    assert not missing, f"README.md does not link docs pages: {missing}"


def _example_script() -> str:
    text = README.read_text(encoding="utf-8")
    parts = EXAMPLE.findall(text)
    assert parts, "README.md has no <!-- example: start --> ... <!-- example: end --> block"
    blocks = [b for part in parts for b in _code_blocks(part, "bash")]
    assert blocks, "the README's example markers hold no ```bash block"
    return "\n".join(blocks)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_the_readme_example_runs(tmp_path):
    """The example's shell block(s), run as from the repository root (kaggle_tta/ is linked
    into a temporary folder), write a submission in the sample's header, ids and order."""
    script = _example_script()
    (tmp_path / "kaggle_tta").symlink_to(ROOT / "kaggle_tta", target_is_directory=True)
    bin_dir = tmp_path / "_bin"  # the block says python3: make it this interpreter
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the README example failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"

    runs = re.findall(r"(?:kaggle-tta|python3 -m kaggle_tta) run (\S+)", script)
    assert runs, "the README example runs no pipeline ('kaggle-tta run PIPELINE')"
    pipeline = tmp_path / runs[-1]
    spec = yaml.safe_load(pipeline.read_text(encoding="utf-8"))
    sub = spec.get("submission", {})
    assert sub.get("sample"), "the README example should show submission.sample (a competition's sample_submission.csv)"
    sample = pipeline.parent / sub["sample"]
    written = pipeline.parent / sub.get("path", "submission.csv")
    assert written.is_file(), f"no submission at {written}:\n{proc.stdout}"

    sample_header, sample_rows = _read_csv(sample)
    header, rows = _read_csv(written)
    assert header == sample_header
    assert len(rows) == len(sample_rows) > 0
    sample_ids = [r[0] for r in sample_rows]
    assert [r[0] for r in rows] == sample_ids, "the submission's ids are not the sample's, in its order"
    assert sample_ids != sorted(sample_ids), "the example's sample should list its ids in an order of its own"
    if sub.get("format") == "probs":
        for r in rows:
            assert abs(sum(float(x) for x in r[1:]) - 1.0) < 1e-3, r


# ---- the reference: every key of the schema --------------------------------------------------


def _models(annotation: object) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (Optional, Union, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _schema_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every YAML key as a dotted path (list items without an index: members.tta)."""
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:  # set by the loader (base_dir, source), not YAML keys
            continue
        path = f"{prefix}{name}"
        keys.append(path)
        for sub in _models(field.annotation):
            keys.extend(_schema_keys(sub, f"{path}."))
    return keys


def test_the_schema_walk_finds_nested_keys():
    keys = set(_schema_keys())
    for key in ("runtime.precision", "members.tta", "data.csv.root", "submission.sample", "submission.rle.order"):
        assert key in keys
    assert "members.adaptive.confidence" in keys and "members.tiling.tile" in keys
    assert "base_dir" not in keys


def _heading_paths(heading: str) -> set[str]:
    """The schema paths a heading names in code spans: `members[].preprocess` -> members.preprocess."""
    return {span.replace("[]", "") for span in re.findall(r"`([^`]+)`", heading)}


def _documents(body: str, leaf: str) -> bool:
    """A key's own row in a table (| `leaf` | default | ...) or its line in a YAML block."""
    if re.search(rf"^\|\s*`{re.escape(leaf)}`\s*\|", body, re.M):
        return True
    return any(re.search(rf"(^|[\s{{,])-?\s*{re.escape(leaf)}:", block, re.M) for block in _code_blocks(body, "yaml"))


def test_every_schema_key_is_in_the_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    sections = _sections(text)
    missing, no_section = [], set()
    for key in _schema_keys():
        parent, _, leaf = key.rpartition(".")
        if not parent:  # top-level keys: a row anywhere (the "Top level" table)
            if not _documents(text, leaf):
                missing.append(key)
            continue
        bodies = [body for heading, body in sections if parent in _heading_paths(heading)]
        if not bodies:
            no_section.add(parent)
        if not any(_documents(body, leaf) for body in bodies):
            missing.append(key)
    headed = "; no section headed " + ", ".join(f"`{p}`" for p in sorted(no_section)) if no_section else ""
    assert not missing, f"schema keys missing from their section of docs/reference.md: {missing}{headed}"


def _defined(spec: dict) -> tuple[set[str], set[str]]:
    members = {m["name"] for m in spec.get("members") or [] if isinstance(m, dict) and "name" in m}
    blends = {b["name"] for b in spec.get("blends") or [] if isinstance(b, dict) and "name" in b}
    return members, blends


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_examples_name_only_what_they_define(page):
    """A blend's inputs and the submission's source are members or blends of the same block."""
    wrong = []
    for block in _code_blocks(page.read_text(encoding="utf-8"), "yaml"):
        spec = yaml.safe_load(block)
        if not isinstance(spec, dict) or not spec.get("blends"):
            continue
        members, blends = _defined(spec)
        for b in spec["blends"]:
            wrong += [f"blend {b.get('name')}: {i}" for i in b.get("inputs", []) if i not in members | blends]
        source = (spec.get("submission") or {}).get("source")
        if source is not None and source not in members | blends:
            wrong.append(f"submission.source: {source}")
        wrong += [f"unknown top-level key {k}" for k in set(spec) - set(PipelineConfig.model_fields)]
    assert not wrong, f"{page.name}: YAML names what it does not define: {wrong}"


# ---- links -----------------------------------------------------------------------------------


def _links(text: str) -> list[str]:
    prose = "\n".join(line for line, code in _split(text) if not code)
    prose = re.sub(r"`[^`]*`", "", prose)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for link in _links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"

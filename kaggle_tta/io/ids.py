"""Ids made from listed paths (``data.id``: a pattern's named groups into a template)."""

from __future__ import annotations

import re

from kaggle_tta.config.errors import DataError


def ids_by_rule(listed: list[str], pattern: str, template: str, where: str) -> list[str]:
    """Each listed id through ``data.id``: the pattern's named groups into the template."""

    rx = re.compile(pattern)
    out = []
    for name in listed:
        m = rx.search(name)
        if m is None:
            raise DataError(f"{where}: '{name}' does not match data.id.pattern {pattern!r}; fix the pattern")
        out.append(template.format(**m.groupdict()))
    return out

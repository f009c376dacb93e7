"""Named views and presets, and the parser for a member's ``tta`` entry.

``tta`` is a preset name (``d4``) or a list whose items are
  - a view name: ``hflip``, ``rot90``, ``crop_tl``, ``scale_1.25``, ``gamma_0.9``, or a
    composite ``crop_tl+hflip`` (ops applied left to right);
  - a preset name, which expands to its views (``d4`` gives eight);
  - a mapping: ``{scales: [0.8, 1.25]}``, ``{brightness: [-0.1, 0.1]}``, ``{contrast: ...}``,
    ``{gamma: ...}`` (any parametric op's keys), or ``{product: [A, B, ...]}`` where each
    factor is any item or list of items and every combination is composed
    (``{product: [hflip, {scales: [1, 1.25]}]}``).

The parametric names and mapping keys are not listed here: the parser asks the op registry
(views.PARAMETRIC), so each op owns its prefix, keys, legal range and identity value.
"""

from __future__ import annotations

import math
from typing import Any

from kaggle_tta.config.errors import ConfigError, did_you_mean
from kaggle_tta.ops.views.views import PARAMETRIC, Crop, HFlip, Op, Parametric, Rot90, Transpose, VFlip, View

# The atomic views. transverse (reflection over the anti-diagonal) is albumentations' 'hvt'.
_ATOMIC: dict[str, tuple[Op, ...]] = {
    "identity": (),
    "hflip": (HFlip(),),
    "vflip": (VFlip(),),
    "rot90": (Rot90(1),),
    "rot180": (Rot90(2),),
    "rot270": (Rot90(3),),
    "transpose": (Transpose(),),
    "transverse": (Rot90(2), Transpose()),
    "crop_tl": (Crop("tl"),),
    "crop_tr": (Crop("tr"),),
    "crop_bl": (Crop("bl"),),
    "crop_br": (Crop("br"),),
}
_PRODUCT = "product"

# albumentations' D4 group elements, in its own order: e, r90, r180, r270, v, hvt, h, t.
D4_ELEMENTS = {
    "e": "identity",
    "r90": "rot90",
    "r180": "rot180",
    "r270": "rot270",
    "v": "vflip",
    "hvt": "transverse",
    "h": "hflip",
    "t": "transpose",
}
_CORNERS = ["crop_tl", "crop_tr", "crop_bl", "crop_br", "identity"]
PRESETS: dict[str, list[str]] = {
    "none": ["identity"],
    "hflip": ["identity", "hflip"],
    "vflip": ["identity", "vflip"],
    "flips": ["identity", "hflip", "vflip"],
    "rot4": ["identity", "rot90", "rot180", "rot270"],
    "d4": list(D4_ELEMENTS.values()),
    "five_crop": _CORNERS,
    # As the reference ten-crop: each crop, then its horizontal flip.
    "ten_crop": [v for c in _CORNERS for v in (c, f"{c}+hflip" if c != "identity" else "hflip")],
}


def _known_names() -> list[str]:
    """What an unknown view name is compared with: every name, preset and one example per
    parametric op (``scale_1.25``)."""
    return [*_ATOMIC, *PRESETS, *(f"{op.prefix}_{op.example:g}" for op in PARAMETRIC.values())]


def _parametric(name: str) -> tuple[Op, ...]:
    """The op a ``<prefix>_<number>`` name gives: none at the op's identity value."""
    prefix, sep, text = name.partition("_")
    op = PARAMETRIC.get(prefix) if sep else None
    if op is None:
        raise ValueError(f"unknown view '{name}'{did_you_mean(name, _known_names())}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{name}': '{text}' is not a number") from None
    try:
        op.validate(value)
    except ValueError as exc:
        raise ValueError(f"'{name}': {exc}") from None
    if not math.isfinite(value):  # after validate: an op's own range message comes first
        raise ValueError(f"'{name}': '{text}' is not a finite number")
    return () if value == op.identity else (op(value),)


def _atomic(name: str) -> tuple[Op, ...]:
    return _ATOMIC[name] if name in _ATOMIC else _parametric(name)


def compose(names: list[str]) -> View:
    """Builds the view ``a+b+...`` from atomic names, in order, with its canonical name."""
    ops: list[Op] = []
    for part in names:
        for op in _atomic(part):
            if op.leads and ops:
                raise ValueError(f"'{'+'.join(names)}': {op.leads} must come first (write '{part}+...')")
            ops.append(op)
    name = _simplify("+".join(op.name for op in ops)) if ops else "identity"
    return View(name, tuple(ops))


def _simplify(name: str) -> str:
    # rot180 then transpose is the named element 'transverse'.
    return name.replace("rot180+transpose", "transverse")


def view_from_name(name: str) -> View:
    """Parses a canonical or composite view name (``crop_tl+hflip``)."""
    return compose([p.strip() for p in name.split("+") if p.strip()])


def _mapping_op(key: str) -> type[Parametric]:
    """The parametric op whose mapping ``key`` lists values (``scales``)."""
    by_key = {k: op for op in PARAMETRIC.values() for k in op.keys}
    if key not in by_key:
        # One key per op in the suggestions (its first), as the docs write them.
        keys = [op.keys[0] for op in PARAMETRIC.values()] + [_PRODUCT]
        raise ValueError(f"unknown view mapping '{key}'{did_you_mean(key, keys)}")
    return by_key[key]


def _expand_item(item: Any) -> list[View]:
    if isinstance(item, str):
        # In a list, a name that is also a preset (hflip, vflip) means the single view.
        if item in PRESETS and item not in _ATOMIC:
            return [view_from_name(n) for n in PRESETS[item]]
        return [view_from_name(item)]
    if isinstance(item, list):
        out: list[View] = []
        for sub in item:
            out.extend(_expand_item(sub))
        return out
    if isinstance(item, dict) and len(item) == 1:
        ((key, value),) = item.items()
        values = value if isinstance(value, list) else [value]
        if key == _PRODUCT:
            combos: list[View] = [view_from_name("identity")]
            for factor in values:
                factor_views = _expand_item(factor)
                combos = [_chain(a, b) for a in combos for b in factor_views]
            return combos
        op = _mapping_op(str(key))
        # Through the name, so that a mapping and a list of names give the same canonical views.
        return [view_from_name(f"{op.prefix}_{float(v):g}") for v in values]
    raise ValueError(f"a view is a name, a list or a one-key mapping, got {item!r}")


def _chain(a: View, b: View) -> View:
    names = [p for p in (a.name.split("+") + b.name.split("+")) if p != "identity"]
    return compose(names or ["identity"])


def parse_tta(spec: str | list[Any], where: str) -> list[View]:
    """Expands a member's ``tta`` entry into distinct views.

    Args:
        spec: The preset name or list from the YAML.
        where: Its YAML path, for errors (``members.effb0.tta``).

    Raises:
        ConfigError: an unknown name, a malformed item or a view listed twice, naming the item.
    """
    if isinstance(spec, str):
        if spec in PRESETS:
            return [view_from_name(n) for n in PRESETS[spec]]
        try:
            return [view_from_name(spec)]
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}; presets are {', '.join(PRESETS)}") from None
    views: list[View] = []
    for i, item in enumerate(spec):
        try:
            views.extend(_expand_item(item))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from None
    if not views:
        raise ConfigError(f"{where}: no views; use 'none' for the plain prediction")
    seen: set[str] = set()
    for v in views:
        if v.name in seen:
            raise ConfigError(f"{where}: view '{v.name}' is listed twice; each view may appear once")
        seen.add(v.name)
    return views

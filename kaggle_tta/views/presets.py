"""Named views and presets, and the parser for a member's ``tta`` entry.

``tta`` is a preset name (``d4``) or a list whose items are
  - a view name: ``hflip``, ``rot90``, ``crop_tl``, ``scale_1.25``, ``gamma_0.9``, or a
    composite ``crop_tl+hflip`` (ops applied left to right);
  - a preset name, which expands to its views (``d4`` gives eight);
  - a mapping: ``{scales: [0.8, 1.25]}``, ``{brightness: [-0.1, 0.1]}``, ``{contrast: ...}``,
    ``{gamma: ...}``, or ``{product: [A, B, ...]}`` where each factor is any item or list of
    items and every combination is composed (``{product: [hflip, {scales: [1, 1.25]}]}``).
"""

from __future__ import annotations

from typing import Any

from kaggle_tta.errors import ConfigError, did_you_mean
from kaggle_tta.views.views import Colour, Crop, HFlip, Op, Rot90, Scale, Transpose, View, VFlip

# The atomic views. transverse (reflection over the anti-diagonal) is albumentations' 'hvt'.
_ATOMIC: dict[str, tuple[tuple[Op, ...], str]] = {
    "identity": ((), "center"),
    "hflip": ((HFlip(),), "center"),
    "vflip": ((VFlip(),), "center"),
    "rot90": ((Rot90(1),), "center"),
    "rot180": ((Rot90(2),), "center"),
    "rot270": ((Rot90(3),), "center"),
    "transpose": ((Transpose(),), "center"),
    "transverse": ((Rot90(2), Transpose()), "center"),
    "crop_tl": ((), "tl"),
    "crop_tr": ((), "tr"),
    "crop_bl": ((), "bl"),
    "crop_br": ((), "br"),
}
_PARAMETRIC = {"scale": Scale, "brightness": "brightness", "contrast": "contrast", "gamma": "gamma"}

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


def _atomic(name: str) -> tuple[tuple[Op, ...], str]:
    if name in _ATOMIC:
        return _ATOMIC[name]
    kind, sep, value = name.partition("_")
    if sep and kind in _PARAMETRIC:
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"'{name}': '{value}' is not a number") from None
        if kind == "scale":
            if not 0.05 <= v <= 8:
                raise ValueError(f"'{name}': scale factors must lie in [0.05, 8]")
            return ((Scale(v),) if v != 1 else ()), "center"
        if kind == "gamma" and v <= 0:
            raise ValueError(f"'{name}': gamma must be positive")
        if kind in ("brightness", "contrast") and not -1 < v < 1:
            raise ValueError(f"'{name}': {kind} must lie in (-1, 1)")
        return ((Colour(kind, v),) if (kind != "gamma" and v != 0) or (kind == "gamma" and v != 1) else ()), "center"
    known = list(_ATOMIC) + list(PRESETS) + ["scale_1.25", "brightness_0.1", "contrast_0.1", "gamma_0.9"]
    raise ValueError(f"unknown view '{name}'{did_you_mean(name, known)}")


def compose(names: list[str]) -> View:
    """Builds the view ``a+b+...`` from atomic names, in order, with its canonical name."""
    ops: list[Op] = []
    position = "center"
    parts: list[str] = []
    for part in names:
        part_ops, part_pos = _atomic(part)
        if part_pos != "center":
            if ops or position != "center":
                raise ValueError(f"'{'+'.join(names)}': a crop must come first (write '{part}+...')")
            position = part_pos
        ops.extend(part_ops)
    crop = Crop(position)
    if crop.position != "center":
        parts.append(crop.name)
    parts.extend(op.name for op in ops)
    name = _simplify("+".join(parts)) if parts else "identity"
    return View(name, tuple(ops), crop)


def _simplify(name: str) -> str:
    # rot180 then transpose is the named element 'transverse'.
    return name.replace("rot180+transpose", "transverse")


def view_from_name(name: str) -> View:
    """Parses a canonical or composite view name (``crop_tl+hflip``)."""
    return compose([p.strip() for p in name.split("+") if p.strip()])


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
        (key, value), = item.items()
        values = value if isinstance(value, list) else [value]
        if key in ("scales", "scale"):
            return [view_from_name(f"scale_{float(v):g}") for v in values]
        if key in ("brightness", "contrast", "gamma"):
            return [view_from_name(f"{key}_{float(v):g}") for v in values]
        if key == "product":
            combos: list[View] = [view_from_name("identity")]
            for factor in values:
                factor_views = _expand_item(factor)
                combos = [_chain(a, b) for a in combos for b in factor_views]
            return combos
        raise ValueError(f"unknown view mapping '{key}'{did_you_mean(key, ['scales', 'brightness', 'contrast', 'gamma', 'product'])}")
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

"""What the Kaggle image already has (``kaggle_image.txt``, with its source and date): the
packages a bundle's wheels dataset leaves out.

A package of the wheel closure is left out when the image's version satisfies every
requirement on it that the closure holds (kaggle_tta's own and its dependencies'), unless
``--wheel-include`` names it or ``--no-lean`` is given. The notebook checks each left-out
package before pip runs (the dataset's manifest lists them with their requirements) and stops
with one line naming what to add where the image it runs on differs.
"""

from __future__ import annotations

from importlib import resources

LIST = "kaggle_image.txt"


def image_packages() -> dict[str, str]:
    """Normalized name -> version, as the checked-in list gives them."""
    from packaging.utils import canonicalize_name

    out: dict[str, str] = {}
    text = resources.files("kaggle_tta.kernel").joinpath(LIST).read_text(encoding="utf-8")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version
    return out


def image_source() -> str:
    """The list's first comment lines naming the image and where the versions come from."""
    text = resources.files("kaggle_tta.kernel").joinpath(LIST).read_text(encoding="utf-8")
    return " ".join(line.lstrip("# ").strip() for line in text.splitlines()[4:8])


def left_out(pins: dict[str, tuple[str, str]], specs: dict[str, str], keep: list[str]) -> dict[str, str]:
    """The pinned packages the image has at a version every requirement on them accepts:
    name -> the requirement text (``>=1.0,<2``; ``""`` for any version)."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    image = image_packages()
    kept = {canonicalize_name(k) for k in keep}
    out: dict[str, str] = {}
    for name in pins:
        if name in kept or name not in image:
            continue
        try:
            ok = SpecifierSet(specs.get(name, "")).contains(Version(image[name]), prereleases=True)
        except InvalidVersion:
            ok = False
        if ok:
            out[name] = specs.get(name, "")
    return out

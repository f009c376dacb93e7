"""Members: resolving their preprocessing, building the model, loading checkpoints safely.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``; nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.config import MemberConfig, PipelineConfig
from kaggle_tta.config.errors import CheckpointError, ConfigError, call_user, did_you_mean

if TYPE_CHECKING:  # torch and timm load on use: resolving a member's inputs needs neither
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys under which training scripts nest the weights, tried in this order.
_NESTINGS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model_state_dict", "model", "module", "net", "params")
_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass(frozen=True)
class Preprocess:
    """A member's resolved input spec."""

    size: tuple[int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    albumentations: str | None  # JSON of the user's A.to_dict pipeline
    backend: str = "albumentations"  # how crops are made: timm | albumentations (kaggle_tta.io.canvas)


_TIMM_FIELDS = ("input_size", "crop_pct", "interpolation", "mean", "std")


def _timm_cfg(arch: str, where: str, memo_dir: Path | None = None) -> dict[str, Any]:
    """The preprocessing fields of timm's pretrained_cfg for ``arch``.

    Memoized per timm version under ``memo_dir``, so that re-blending, which must resolve the
    same inputs, does not import timm (and torch) again.
    """
    memo = _timm_memo(memo_dir) if memo_dir is not None else None
    table: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
        if arch in table:
            return table[arch]
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        raise ConfigError(f"{where}.arch: unknown timm architecture '{arch}'{did_you_mean(arch, timm.list_models())}")
    pc = get_pretrained_cfg(arch) or get_pretrained_cfg(arch.split(".")[0])
    fields = (
        {k: (list(v) if isinstance(v, tuple) else v) for k in _TIMM_FIELDS if (v := getattr(pc, k, None)) is not None}
        if pc
        else {}
    )
    if memo is not None:
        table[arch] = fields
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        try:  # a memo only: a cache that cannot take it is reported where predictions are written
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(table, sort_keys=True))
            tmp.replace(memo)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return fields


def _timm_memo(memo_dir: Path) -> Path:
    """Where timm's preprocessing fields are memoized, per timm version (read without timm)."""
    from importlib.metadata import version

    return memo_dir / f"timm-{version('timm')}-cfg.json"


def needs_timm(cfg: PipelineConfig, m: MemberConfig) -> bool:
    """Whether resolving ``m``'s preprocessing imports timm: an arch member whose preprocessing
    the YAML leaves to timm's pretrained_cfg and whose fields are not memoized (_timm_cfg)."""
    if not m.arch or all(getattr(m.preprocess, k) is not None for k in _TIMM_FIELDS):
        return False
    try:
        return m.arch not in json.loads(_timm_memo(cfg.resolve(cfg.cache.dir) / ".digests").read_text())
    except (OSError, ValueError):
        return True


def resolve_preprocess(cfg: PipelineConfig, m: MemberConfig, default_size: tuple[int, int] | None = None) -> Preprocess:
    """YAML values first, then timm's pretrained_cfg for the arch, then defaults.

    ``default_size`` replaces the input size altogether (segmentation: the canvas or tile).
    """
    where = f"members.{m.name}"
    p = m.preprocess
    given = all(getattr(p, k) is not None for k in _TIMM_FIELDS)
    pc = _timm_cfg(m.arch, where, cfg.resolve(cfg.cache.dir) / ".digests") if m.arch and not given else {}
    size = default_size or p.input_size or pc.get("input_size")
    if size is None:
        raise ConfigError(f"{where}.preprocess.input_size: required for a factory model (e.g. [3, 224, 224])")
    hw = (int(size[-2]), int(size[-1]))
    crop_pct = p.crop_pct or pc.get("crop_pct") or 1.0
    interp = p.interpolation or (
        pc["interpolation"] if pc.get("interpolation") in ("nearest", "bilinear", "bicubic") else "bilinear"
    )
    mean = _values(p.mean) or tuple(pc.get("mean") or IMAGENET_MEAN)
    std = _values(p.std) or tuple(pc.get("std") or IMAGENET_STD)
    reader = cfg.data.reader
    made = len(reader.channels or reader.columns or (reader.slices.offsets if reader.slices else [])) or None
    if cfg.data.plain_images:
        n: int | None = 3
    elif made is not None:
        n = 3 if made == 1 and reader.gray == "rgb" else made  # one channel repeats to 3 (gray: rgb)
    else:
        n = None  # a single file of any channel count: normalize checks it on the first batch
    if n is not None and len(mean) == len(std) == 1:  # one value for every channel
        mean, std = mean * n, std * n
    if (n is not None and (len(mean) != n or len(std) != n)) or len(mean) != len(std) or any(s <= 0 for s in std):
        said = f"{n} values each" if n is not None else "one value per channel each"
        raise ConfigError(f"{where}.preprocess: mean and std need {said}, std positive")
    alb = None
    if p.albumentations is not None:
        if p.backend == "timm":
            raise ConfigError(
                f"{where}.preprocess.backend: timm makes its own crops; remove it or preprocess.albumentations"
            )
        alb = _load_albumentations(cfg, p.albumentations, f"{where}.preprocess.albumentations")
    # auto: timm's eval transform where the preprocessing is timm's (an arch member), the
    # reference document's OpenCV path for a factory member
    plain = cfg.data.plain_images  # timm's transform takes 8-bit RGB only
    if p.backend == "timm" and not plain:
        raise ConfigError(
            f"{where}.preprocess.backend: timm's transform takes 8-bit RGB images; data.reader gives other "
            "intensities or channels: use backend albumentations (or auto)"
        )
    backend = p.backend if p.backend != "auto" else ("timm" if m.arch and alb is None and plain else "albumentations")
    return Preprocess(hw, float(crop_pct), interp, mean, std, alb, backend)


def _load_albumentations(cfg: PipelineConfig, spec: dict[str, Any] | Path, where: str) -> str:
    import albumentations as A

    from kaggle_tta.config.yaml_files import read_yaml_file

    if not isinstance(spec, dict):
        path = cfg.resolve(spec)
        if not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist")
        try:
            spec = read_yaml_file(path)  # JSON is YAML too
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    try:
        A.from_dict(spec)
    except Exception as exc:  # albumentations raises several types for a bad dict
        raise ConfigError(f"{where}: not an albumentations pipeline in A.to_dict form ({exc})") from None
    return json.dumps(spec, sort_keys=True)


def _values(v: float | list[float] | None) -> tuple[float, ...]:
    """``preprocess.mean`` or ``std`` as given: a list, or one number for every channel."""
    if v is None:
        return ()
    return (float(v),) if isinstance(v, (int, float)) else tuple(v)


def build_model(cfg: PipelineConfig, m: MemberConfig, num_classes: int) -> nn.Module:
    """Builds a member with its weights loaded, in eval mode, on the CPU."""
    where = f"members.{m.name}"
    if m.arch:
        import timm

        if not timm.is_model(m.arch):
            raise ConfigError(
                f"{where}.arch: unknown timm architecture '{m.arch}'{did_you_mean(m.arch, timm.list_models())}"
            )
        try:
            model = timm.create_model(m.arch, pretrained=False, num_classes=num_classes, **m.kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}.kwargs: {_first_line(exc)}") from None
    else:
        model = _call_factory(m, cfg, where)
    if m.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint_of(m), f"{where}.checkpoint")  # type: ignore[arg-type]
    elif m.arch:
        raise ConfigError(
            f"{where}.checkpoint: a timm member needs its trained weights (a .safetensors or torch state dict)"
        )
    return model.eval()


def import_callable(spec: str, where: str, wrap: bool = True) -> Any:
    """The object named by ``package.module:attr.path``; errors name ``where`` and the fix.

    This is the boundary of the user's code: importing the module, and (``wrap``) every call
    of what it names, go through :func:`kaggle_tta.config.errors.call_user`, so that whatever
    they raise is one line naming ``where`` and the callable. ``wrap=False`` for a caller that
    says so itself (a model factory)."""
    mod_name, _, attr = spec.partition(":")
    try:
        fn: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import '{mod_name}' ({exc}); install it or fix the name") from None
    except Exception as exc:  # the module itself raises on import (a syntax error, a failing top level)
        said = f"{type(exc).__name__}: {_first_line(exc)}"
        raise ConfigError(f"{where}: importing '{mod_name}' raised {said}; fix that module") from None
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{where}: '{mod_name}' has no '{attr}'")
        fn = getattr(fn, part)
    if not wrap or not callable(fn):
        return fn
    label = f"{where} ({spec})"

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        return call_user(fn, label, *args, **kwargs)

    return guarded


def _call_factory(m: MemberConfig, cfg: PipelineConfig, where: str) -> nn.Module:
    from torch import nn

    spec = m.factory
    assert spec is not None
    fn = import_callable(spec, f"{where}.factory", wrap=False)  # its failure is said below
    # Path-like string kwargs (config.FACTORY_PATH_KWARGS) resolve against pipeline.yaml.
    kw = {**m.kwargs, **{k: str(cfg.resolve(v)) for k, v in m.path_kwargs().items()}}
    try:
        model = fn(**kw)
    except Exception as exc:  # a user factory can raise anything
        raise ConfigError(f"{where}.factory: {spec}(**kwargs) failed: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}.factory: {spec} returned {type(model).__name__}, not a torch nn.Module")
    return model


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2 and up)
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_checkpoint(path: Path, where: str) -> None:
    """Refuses, from its first bytes alone, a checkpoint that cannot be loaded: missing,
    empty, a safetensors file whose header is cut or garbage, or a torch file that is neither
    a zip archive nor a pickle. Cheap (reads the header, not the weights), so a plan can
    check every member before the first forward."""
    if not path.is_file():
        raise CheckpointError(f"{where}: checkpoint {path} not found; run 'make demo-weights' or fix the path")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise CheckpointError(f"{where}: {path} is empty (0 bytes); save or download the checkpoint again")
            if path.suffix == ".safetensors":
                _check_safetensors_header(f, head, size, path, where)
            elif not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
                raise CheckpointError(
                    f"{where}: {path} is not a torch checkpoint (neither a torch.save zip nor a pickle); "
                    "save a plain state dict with torch.save, or a .safetensors file"
                )
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None


def _check_safetensors_header(f: Any, head: bytes, size: int, path: Path, where: str) -> None:
    """The layout: an 8-byte little-endian header length, a JSON header, the tensors' bytes."""
    bad = f"{where}: {path} is not a complete safetensors file ({{}}); save or download it again"
    if len(head) < 8:
        raise CheckpointError(bad.format(f"{size} bytes, shorter than its header"))
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
        if head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):  # only a guess once the header is impossible
            raise CheckpointError(f"{where}: {path} is a torch.save file, not safetensors; rename it to .pt")
        if n > _MAX_SAFETENSORS_HEADER:  # more than safetensors itself accepts: this is no header
            raise CheckpointError(
                f"{where}: {path} is not a safetensors file (it does not start with a safetensors header)"
            )
        raise CheckpointError(bad.format(f"its header claims {n} bytes, the file has {size}"))
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(bad.format("its header is not JSON")) from None
    if not isinstance(header, dict):
        raise CheckpointError(bad.format("its header is not a table of tensors"))
    offsets = [t.get("data_offsets") for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max((o[-1] for o in offsets if isinstance(o, list) and o and isinstance(o[-1], int)), default=0)
    if need > size:
        raise CheckpointError(bad.format(f"truncated: {size} of {need} bytes"))


def _first_line(exc: BaseException) -> str:
    """An exception's message as one short line; its type where it has none (EOFError())."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0][:200] if lines else "") or type(exc).__name__


def read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Reads weights safely and unwraps the usual nestings and prefixes."""
    import torch

    check_checkpoint(path, where)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise CheckpointError(
            f"{where}: cannot load {path} safely ({_first_line(exc)}); save a plain state dict or safetensors"
        ) from None
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            key = next((k for k in _NESTINGS if k in sd and isinstance(sd[k], dict)), None)
            if key is None:
                break
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{where}: {path} holds no state dict (found {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: nn.Module, path: Path, where: str) -> None:
    """Loads weights strictly, explaining a class-count or key mismatch."""
    sd = read_state_dict(path, where)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: {path.name} does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check the arch/factory and kwargs"
        )
    for k, v in own.items():
        if sd[k].shape != v.shape:
            head = (
                k.endswith(("weight", "bias"))
                and v.dim() <= 2
                and k.split(".")[0] in ("fc", "head", "classifier", "last_linear", "heads")
            )
            hint = (
                f"the checkpoint has {sd[k].shape[0]} classes, the pipeline declares {v.shape[0]} (data.classes)"
                if head or (v.dim() >= 1 and sd[k].shape[1:] == v.shape[1:])
                else "check the arch/kwargs"
            )
            raise CheckpointError(
                f"{where}: {path.name}: '{k}' has shape {tuple(sd[k].shape)}, the model {tuple(v.shape)}: {hint}"
            )
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in own.items()}, strict=True)

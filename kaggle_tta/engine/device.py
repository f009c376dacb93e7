"""The device, the precision ``auto`` resolves to, decode workers and CPU threads."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kaggle_tta.config.errors import ConfigError

if TYPE_CHECKING:  # torch loads only where a device is resolved: re-blending never needs it
    import torch


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: '{name}' but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower
    than fp32, so 'auto' keeps fp32 there."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(
    setting: int | str, device: torch.device, threads: int | None, per_host: int = 1
) -> tuple[int, int | None]:
    """(decode workers, torch CPU threads to set or None) for ``runtime.workers``.

    On the CPU the forward and the decoding share the cores: a worker that takes a core from
    a 2-thread forward stalls its synchronized kernels, so small machines decode in-process,
    and larger ones leave the workers' cores out of torch's threads. ``per_host``: ranks on this
    machine, which divide its cores among them.
    """
    cores = max(1, cpu_cores() // max(1, per_host))
    if setting != "auto":
        return int(setting), threads
    if device.type == "cuda":
        return min(8, max(0, cores - 1)), threads
    if cores <= 4:
        return 0, threads
    workers = max(1, cores // 8)
    return workers, threads if threads else cores - workers


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where native (CUDA capability >= 8.0, CPUs with AVX512-BF16 or AMX), fp16 on
    older CUDA devices (T4, V100, P100), else fp32."""
    import torch

    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("runtime.precision: fp16 autocast is for CUDA; on the CPU use bf16, fp32 or auto")
        return name
    if device.type == "cuda":
        # Native bf16 from compute capability 8.0 (Ampere) on. torch's is_bf16_supported()
        # answers True on a T4 (7.5) through emulation, slower than fp32 there, and cuDNN has
        # no bf16 convolutions below 8.0: fp16 is the T4's, V100's and P100's fast path.
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def world_for(devices: int | str, device_setting: str) -> int:
    """Ranks for ``runtime.devices``: all = every CUDA device (1 without CUDA). A count above
    what this machine has (its CUDA devices, or on the CPU its cores) is refused before any
    rank starts: each rank is a process with its own model."""
    if devices != "all" and int(devices) <= 1:
        return int(devices)
    import torch

    cuda = device_setting != "cpu" and torch.cuda.is_available()
    if devices == "all":
        return max(1, torch.cuda.device_count()) if cuda else 1
    have, what = (torch.cuda.device_count(), "CUDA devices") if cuda else (cpu_cores(), "CPU cores")
    if int(devices) > have:
        raise ConfigError(
            f"runtime.devices: {devices} ranks, but this machine has {have} {what}; "
            f"use at most {have} (or all), or 1 for one process"
        )
    return int(devices)

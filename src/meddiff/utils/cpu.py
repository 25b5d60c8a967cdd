"""CPU choices for demos and tests: bf16 autocast when the CPU computes bf16 natively, and a thread count that
does not collapse on a busy machine.

- ``bf16_support()`` reads the CPU flags (``/proc/cpuinfo``: ``amx_bf16`` or ``avx512_bf16``) and torch's CPU
  capability. Without native bf16 instructions, autocast still runs but emulates bf16 and is usually *slower* than
  fp32, so ``choose_precision("auto")`` returns ``"bf16-mixed"`` only with native support, ``"32-true"`` otherwise,
  and logs why. Measured on this project's 2-core AMD EPYC (AVX-512-BF16, no AMX): the demo UNet's training step
  ~1.5x faster with bf16 autocast (``bench/bench_precision.py``).
- ``choose_threads("auto")``: OpenMP threads spin on busy cores; with other work running, 2 threads on 2 busy cores
  made training ~10x slower than idle while 1 thread degraded gracefully. The choice is the number of cores the
  1-minute load average leaves free (rounded, at least 1, at most the cores this process may use).
- ``cpu_report()``: what was chosen and why, for report.json (a result must say the precision and threads it used).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_PRECISIONS = ("auto", "bf16-mixed", "32-true")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty when the file is missing: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return set(value.split())
    return set()


def bf16_support(flags: set[str] | None = None) -> dict[str, Any]:
    """Whether this CPU computes bf16 natively.

    Returns:
        ``{"native_bf16": bool, "flags": [the bf16 flags found], "torch_capability": str}``. ``native_bf16`` is True
        with AMX-BF16 or AVX-512-BF16 (x86) or ``bf16`` (arm64 ``Features``).
    """
    f = cpu_flags() if flags is None else set(flags)
    found = sorted(f & {*BF16_FLAGS, "bf16"})
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        capability = "unknown"
    return {"native_bf16": bool(found), "flags": found, "torch_capability": capability}


def choose_precision(requested: str = "auto", flags: set[str] | None = None) -> str:
    """Lightning precision for a CPU run: ``"bf16-mixed"`` with native bf16 (``"auto"``), else ``"32-true"``.

    An explicit ``"bf16-mixed"`` / ``"32-true"`` is kept as given. The choice and its reason are logged.
    """
    if requested not in CPU_PRECISIONS:
        raise ConfigError(f"CPU precision {requested!r} is not one of {list(CPU_PRECISIONS)}.")
    if requested != "auto":
        log.info("CPU precision %s (as configured).", requested)
        return requested
    info = bf16_support(flags)
    if info["native_bf16"]:
        log.info("CPU precision bf16-mixed: native bf16 instructions (%s).", ", ".join(info["flags"]))
        return "bf16-mixed"
    log.info("CPU precision 32-true: no native bf16 (AMX-BF16 / AVX-512-BF16) on this CPU; emulated bf16 is slower.")
    return "32-true"


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unavailable)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(
    requested: int | str | None = "auto", load: float | None = None, n_cpus: int | None = None
) -> int:
    """Torch threads for a CPU run.

    Args:
        requested: a positive int (kept), or ``"auto"`` / None: the cores the load leaves free,
            ``clamp(round(n_cpus - load), 1, n_cpus)``; so 1 thread as soon as the other work fills all but half a
            core.
        load: the 1-minute load average (default ``os.getloadavg()[0]``; 0 where unavailable). Call this before
            starting heavy work of your own, or the load counts it.
        n_cpus: cores available (default ``usable_cpus()``).
    """
    if isinstance(requested, bool):
        raise ConfigError(f"threads={requested!r} must be a positive integer or 'auto'.")
    if isinstance(requested, int):
        if requested < 1:
            raise ConfigError(f"threads={requested} must be >= 1 (or 'auto').")
        return requested
    if requested not in (None, "auto"):
        raise ConfigError(f"threads={requested!r} must be a positive integer or 'auto'.")
    n = usable_cpus() if n_cpus is None else int(n_cpus)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    free = n - float(load)
    threads = max(1, min(n, math.floor(free + 0.5)))
    log.info("torch threads %d: load average %.2f on %d usable cores.", threads, load, n)
    return threads


def apply_threads(requested: int | str | None = "auto") -> int:
    """``torch.set_num_threads(choose_threads(requested))``; returns the count set."""
    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


def cpu_report(precision: str | None = None) -> dict[str, Any]:
    """What a CPU result ran with: precision, torch threads, load, cores and bf16 support (for report.json)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = float("nan")
    return {
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load,
        "usable_cpus": usable_cpus(),
        **{f"cpu_{k}": v for k, v in bf16_support().items()},
    }

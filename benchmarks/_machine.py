"""The machine line every CPU benchmark prints beside its figures."""

from __future__ import annotations

import os
import platform


def cpu_line() -> str:
    """CPU model, core count and the current 1-minute load average."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return (f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
            f"Python {platform.python_version()}")

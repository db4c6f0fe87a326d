"""Which CUDA work waits for a busy kernel on another stream (a diagnostic, one table).

docs/integration.md says that work queued on the legacy default stream does
not wait for the transfer engine's side stream. This script shows it, and
the one exception found while testing that claim: the *first* launch of a
kernel in a process waits for every kernel running on the device, whatever
the streams, because CUDA loads modules lazily (``CUDA_MODULE_LOADING=LAZY``,
the default since CUDA 12.2) and loading waits for the device. Each row
keeps one stream busy with a ~0.5 s spin kernel, then queues a small piece of
work on another stream and times how long it takes to complete.

    python benchmarks/diagnostics/stream_waits.py
    CUDA_MODULE_LOADING=EAGER python benchmarks/diagnostics/stream_waits.py
"""

from __future__ import annotations

import os
import time

import torch

SPIN_CYCLES = 1_000_000_000  # ~0.5 s on an H200


def _queue(work: str, device: torch.device) -> None:
    if work == "copy":
        src = torch.empty(1 << 20, device=device)
        torch.empty_like(src).copy_(src)
    elif work == "warm kernel":
        torch.ones(1, device=device).add_(1)  # launched once before the rows
    elif work == "first-launch kernel":  # kernels this process has not launched before
        torch.ones(1, device=device).sin_()
    else:
        torch.ones(1, device=device).cos_()


def waited_ms(busy: torch.cuda.Stream, then: torch.cuda.Stream, work: str,
              device: torch.device) -> tuple[float, bool]:
    """(ms until `work` on `then` completed, whether `busy`'s spin had ended by then)."""
    torch.cuda.synchronize(device)
    with torch.cuda.stream(busy):
        torch.cuda._sleep(SPIN_CYCLES)
    start = time.perf_counter()
    with torch.cuda.stream(then):
        _queue(work, device)
        done = torch.cuda.Event()
        done.record()
    while not done.query():
        pass
    took = (time.perf_counter() - start) * 1e3
    ended = bool(busy.query())
    torch.cuda.synchronize(device)
    return took, ended


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("stream_waits.py needs a CUDA device")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    _queue("warm kernel", device)
    _queue("copy", device)
    torch.cuda.synchronize(device)
    default = torch.cuda.default_stream(device)
    side, other = torch.cuda.Stream(device), torch.cuda.Stream(device)
    rows = [("side stream", side, "legacy default", default, "warm kernel"),
            ("side stream", side, "legacy default", default, "copy"),
            ("legacy default", default, "side stream", side, "warm kernel"),
            ("side stream", side, "another stream", other, "warm kernel"),
            ("side stream", side, "another stream", other, "first-launch kernel"),
            ("side stream", side, "legacy default", default, "another first launch")]
    print(f"stream_waits: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(unset: LAZY)')}")
    print(f"{'busy stream':<16} {'work on':<16} {'work':<20} {'ms to done':>10}  "
          "waited for the spin")
    for busy_name, busy, then_name, then, work in rows:
        took, ended = waited_ms(busy, then, work, device)
        print(f"{busy_name:<16} {then_name:<16} {work:<20} {took:10.2f}  "
              f"{'yes' if ended else 'no'}")

if __name__ == "__main__":
    main()

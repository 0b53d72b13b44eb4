"""edgebox-fw: the firmware as its own process, idling the chips in real time.

    python -m firmware_stub --root /run/edgebox/fw --profile r100-edge --chips 4

Device time here is wall time (monotonic): every tick each chip idles for the elapsed time at
its current clock, the tree is republished, and writes to ``chip<N>/cpufreq/scaling_max_freq``
are picked up.  Activity from the runtime is not fed to this process (chips that run work
host a ``Firmware`` in-process); this mode gives tools and the daemon a live, idle box to read.
SIGTERM or SIGINT: finish the tick, remove ``<root>/firmware``, exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from edgebox.errors import EdgeboxError
from firmware_stub.firmware import Firmware
from firmware_stub.hwmon import DEFAULT_ROOT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgebox-fw", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"tree to publish (default {DEFAULT_ROOT})")
    ap.add_argument("--profile", default="r100-edge", help="chip profile name or .toml path")
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--tick-s", type=float, default=0.1, help="seconds between updates (default 0.1)")
    ap.add_argument("--average-interval-s", type=float, default=1.0, help="power1_average window")
    ap.add_argument("--energy-wrap-uj", type=int, default=2**32)
    ap.add_argument("--duration-s", type=float, default=None, help="exit after this long (tests)")
    args = ap.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fw = Firmware(
            args.profile,
            args.chips,
            root=args.root,
            energy_wrap_uj=args.energy_wrap_uj,
            publish_interval_s=args.tick_s,
            average_interval_s=args.average_interval_s,
            start_max_mhz=None,
        )
    except (EdgeboxError, ValueError, OSError) as e:
        print(f"edgebox-fw: {e}", file=sys.stderr)
        return 2
    start = last = time.monotonic()
    try:
        while not stop.is_set():
            if stop.wait(args.tick_s):
                break
            now = time.monotonic()
            for chip in range(args.chips):
                fw.idle(chip, now - last)
            fw.publish()
            last = now
            if args.duration_s is not None and now - start >= args.duration_s:
                break
    finally:
        fw.close()
        (args.root / "firmware").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

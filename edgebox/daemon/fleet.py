"""One site's power budget shared by many boxes over the broker: the fleet controller.

Each box's telemetry carries ``fleet``: its price curve, the tokens/s its own price table
(``edgebox.power.table.PowerTable``: steady decode per DVFS level and batch) predicts at each
power, reduced to the upper concave hull of those (watts, tokens/s) points (``box_curve``), and
the marginal tokens/s per watt at its current budget.

**The allocation rule** (``allocate``), for a site budget W and the online boxes' curves:

1. every box gets its floor, the first point of its curve (lowest clock, one stream: below it
   the box cannot serve at all); if the floors alone exceed W, W is split in proportion to them;
2. the rest goes greedily, segment by segment, to the highest marginal tokens/s per watt over
   all boxes (water-filling: the curves are concave, so this maximises the predicted fleet
   tokens/s for the watts given);
3. watts no curve can use (every box at its top) are split evenly, so the budgets sum to W.

Budgets are rounded down to milliwatts: their sum never exceeds W.  The controller lowers
budgets before it raises any, so the site stays within W while watts move between boxes.

``FleetController`` keeps no state of its own between restarts: it subscribes to every box's
retained ``status`` and ``state`` and to ``telemetry``, so a new controller rebuilds the picture
within one telemetry period.  A box whose status turns offline (its Last Will) leaves the
allocation at once (the controller wakes on the status change) and its watts go to the others;
a box that comes back online gets a share again with its first telemetry.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgebox.daemon.client import ClientError, CommandFailed, FleetClient
from edgebox.daemon.schemas import API_PREFIX

log = logging.getLogger("edgebox.fleet")

Curve = tuple[tuple[float, float], ...]  # ((watts, tokens/s), ...): increasing in both, concave


# -- the price curve (pure) -------------------------------------------------------------------------


def upper_hull(points: Iterable[tuple[float, float]]) -> Curve:
    """The upper concave hull of (watts, tokens/s) points, from the lowest-power point up to the
    fastest one: what a box can reach by time-mixing its settings, as a concave curve."""
    pts = sorted({(float(w), float(t)) for w, t in points if math.isfinite(w) and math.isfinite(t) and w > 0})
    if not pts:
        return ()
    # at equal watts keep the fastest; the curve starts at the lowest watts
    by_w: dict[float, float] = {}
    for w, t in pts:
        by_w[w] = max(t, by_w.get(w, t))
    pts = sorted(by_w.items())
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    top = max(range(len(hull)), key=lambda i: hull[i][1])  # more watts past the fastest point buy nothing
    return tuple(hull[: top + 1])


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def box_curve(table) -> Curve:
    """A ``PowerTable``'s curve: steady decode at every (level, batch) of the table."""
    return upper_hull(
        (table.power(lv, b), table.tokens(lv, b)) for lv in range(table.n_levels) for b in range(1, table.max_batch + 1)
    )


def marginal(curve: Curve, watts: float) -> float:
    """Predicted tokens/s per extra watt at ``watts`` (the slope of the segment holding it; the
    first segment's below the floor, 0 past the top)."""
    for (w0, t0), (w1, t1) in zip(curve, curve[1:], strict=False):
        if watts < w1:
            return (t1 - t0) / (w1 - w0)
    return 0.0


def predicted_tokens(curve: Curve, watts: float) -> float:
    """Tokens/s the curve predicts at ``watts`` (0 below the floor, the top past the last point)."""
    if not curve or watts < curve[0][0]:
        return 0.0
    for (w0, t0), (w1, t1) in zip(curve, curve[1:], strict=False):
        if watts <= w1:
            return t0 + (watts - w0) * (t1 - t0) / (w1 - w0)
    return curve[-1][1]


def allocate(curves: dict[str, Curve], site_w: float) -> dict[str, float]:
    """Each box's budget in watts (the module docstring states the rule); sum <= ``site_w``."""
    if not (math.isfinite(site_w) and site_w > 0):
        raise ValueError(f"budget: a site budget must be a positive number of watts, got {site_w!r}")
    boxes = sorted(b for b, c in curves.items() if c)
    if not boxes:
        return {}
    floors = {b: curves[b][0][0] for b in boxes}
    total_floor = sum(floors.values())
    if total_floor >= site_w:
        return {b: _down(site_w * floors[b] / total_floor) for b in boxes}
    give = dict(floors)
    left = site_w - total_floor
    segments = [
        ((t1 - t0) / (w1 - w0), b, i, w1 - w0)
        for b in boxes
        for i, ((w0, t0), (w1, t1)) in enumerate(zip(curves[b], curves[b][1:], strict=False))
    ]
    # highest marginal tokens/s per watt first; within a box its slopes fall, so its segments stay in order
    for _, b, _, dw in sorted(segments, key=lambda s: (-s[0], s[1], s[2])):
        take = min(dw, left)
        give[b] += take
        left -= take
        if left <= 0:
            break
    if left > 0:
        for b in boxes:
            give[b] += left / len(boxes)
    return {b: _down(w) for b, w in give.items()}


def _down(watts: float) -> float:
    return math.floor(watts * 1000 + 1e-6) / 1000


# -- the controller ---------------------------------------------------------------------------------


@dataclass
class BoxView:
    """What the retained messages and the last telemetry say about one box."""

    device_id: str
    online: bool = False
    curve: Curve = ()
    budget_w: float | None = None
    power_w: float | None = None
    tokens_per_s: float | None = None
    joules_per_token: float | None = None
    marginal_tps_per_w: float | None = None
    telemetry_at: float | None = None  # time.monotonic() of the last telemetry
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {
            "device_id": self.device_id,
            "online": self.online,
            "budget_w": self.budget_w,
            "power_w": self.power_w,
            "tokens_per_s": self.tokens_per_s,
            "joules_per_token": self.joules_per_token,
            "marginal_tps_per_w": self.marginal_tps_per_w,
        }


def view_from_telemetry(view: BoxView, t: dict) -> None:
    """Fill ``view`` from one telemetry message (unknown or missing fields stay None)."""
    fleet = t.get("fleet") or {}
    curve = fleet.get("curve")
    if isinstance(curve, list):
        try:
            view.curve = upper_hull((float(w), float(tps)) for w, tps in curve)
        except (TypeError, ValueError):
            view.curve = ()
    view.marginal_tps_per_w = _num(fleet.get("marginal_tps_per_w"))
    view.budget_w = _num(t.get("budget_w"))
    power = t.get("power") or {}
    view.power_w = _num(power.get("power_1s_w")) if _num(power.get("power_1s_w")) is not None else _num(t.get("power_w"))
    view.tokens_per_s = _num(t.get("tokens_per_s"))
    engine = t.get("engine") or {}
    energy, tokens = engine.get("energy") or {}, _num(engine.get("generated_tokens"))
    total, idle = _num(energy.get("total_j")), _num(energy.get("idle_j"))
    view.joules_per_token = round((total - idle) / tokens, 6) if tokens and total is not None and idle is not None else None
    view.telemetry_at = time.monotonic()


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


class FleetWatch:
    """Every box's view, from the retained ``status``/``state`` and the ``telemetry`` topics
    (what ``edgebox client fleet`` prints and the controller allocates from)."""

    def __init__(self, client: FleetClient, on_change: Callable[[], None] = lambda: None):
        self.client = client
        self.on_change = on_change  # a box came or went, or sent its first curve
        self.boxes: dict[str, BoxView] = {}
        self.lock = threading.Lock()

    def start(self) -> FleetWatch:
        for kind in ("status", "state", "telemetry"):
            self.client.follow(f"{API_PREFIX}/+/{kind}", self._on_box_message)
        return self

    def rows(self) -> list[dict]:
        with self.lock:
            return [self.boxes[d].row() for d in sorted(self.boxes)]

    def _on_box_message(self, client, userdata, msg) -> None:
        """paho's network thread: update the box's view."""
        parts = msg.topic.split("/")
        if len(parts) != 4 or parts[2] == "fleet":
            return
        device, kind = parts[2], parts[3]
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        changed = False
        with self.lock:
            view = self.boxes.setdefault(device, BoxView(device))
            if kind == "status":
                online = data.get("state") == "online"
                changed = online != view.online
                view.online = online
                if not online:
                    view.curve = ()  # a returning box is counted again from its first telemetry
            elif kind == "telemetry":
                had_curve = bool(view.curve)
                view_from_telemetry(view, data)
                changed = bool(view.curve) and not had_curve and view.online
            elif kind == "state":
                view.extra["state"] = data
        if changed:
            self.on_change()


class FleetController:
    """Holds a site within ``budget_w`` by setting each online box's budget (``set_power_budget``).

    ``step()`` runs one allocation and sends the changes; ``run()`` repeats it every
    ``interval_s`` and at once when a box goes offline or online.  Usable from Python::

        with FleetController("mqtt://broker:1883", budget_w=30) as fc:
            fc.run(stop=threading.Event())
    """

    def __init__(
        self,
        broker: str,
        budget_w: float,
        *,
        interval_s: float = 2.0,
        min_change_w: float = 0.01,
        command_timeout_s: float = 5.0,
        on_step: Callable[[dict[str, float]], None] | None = None,
        **client_kwargs,
    ):
        if not (isinstance(budget_w, (int, float)) and math.isfinite(budget_w) and budget_w > 0):
            raise ValueError(f"budget: the site budget must be a positive number of watts, got {budget_w!r}")
        if not interval_s > 0:
            raise ValueError(f"interval: must be a positive number of seconds, got {interval_s!r}")
        self.budget_w = float(budget_w)
        self.interval_s = interval_s
        self.min_change_w = min_change_w
        self.command_timeout_s = command_timeout_s
        self.on_step = on_step
        self.client = FleetClient(broker, **client_kwargs)
        self._wake = threading.Event()
        self.watch = FleetWatch(self.client, on_change=self._wake.set)
        self.sent: dict[str, float] = {}  # the budget last confirmed per box (while it stays online)
        self.allocation: dict[str, float] = {}

    # -- connection ---------------------------------------------------------------------------------
    def connect(self) -> FleetController:
        self.client.connect()
        self.watch.start()
        return self

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> FleetController:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one allocation -----------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Allocate over the online boxes with a curve and send what changed: decreases first,
        so the site stays within the budget while watts move."""
        with self.watch.lock:
            boxes = self.watch.boxes
            for d in [d for d in self.sent if not (d in boxes and boxes[d].online)]:
                del self.sent[d]  # gone: when it comes back, its own telemetry says its budget
            curves = {d: v.curve for d, v in boxes.items() if v.online and v.curve}
            current = {d: self.sent.get(d, boxes[d].budget_w) for d in curves}
        plan = allocate(curves, self.budget_w) if curves else {}
        changes = [(d, w) for d, w in plan.items() if current.get(d) is None or abs(current[d] - w) >= self.min_change_w]
        changes.sort(key=lambda c: c[1] - (current.get(c[0]) or 0.0))  # the largest decrease first
        for device, watts in changes:
            try:
                self.client.call(device, "set_power_budget", {"watts": watts}, timeout=self.command_timeout_s)
            except (ClientError, CommandFailed) as e:
                log.warning("set_power_budget %.3f W on %s failed: %s", watts, device, e)
                continue
            with self.watch.lock:
                self.sent[device] = watts
                if device in self.watch.boxes:
                    self.watch.boxes[device].budget_w = watts
        self.allocation = plan
        if changes:
            log.info("fleet budget %.3g W: %s", self.budget_w, ", ".join(f"{d}={w:.3f}" for d, w in sorted(plan.items())))
        if self.on_step is not None:
            self.on_step(plan)
        return plan

    def wake(self) -> None:
        """Run the next allocation now (and let ``run`` see its stop event)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Allocate every ``interval_s``, and at once when a box comes or goes, until ``stop``
        (set it, then call ``wake``)."""
        while not stop.is_set():
            self._wake.clear()
            self.step()
            self._wake.wait(self.interval_s)

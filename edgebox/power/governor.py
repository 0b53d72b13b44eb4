"""The power governor: hold the box's measured power inside the budget at the best tokens/s.

``decide`` (a tick every ``inner_s`` of device time: guards, protections, thermal derating, budget
changes, the batch loop) and ``modulate`` (after every step: the next step's clock) are pure
functions returning a ``Decision``. ``PowerGovernor``, an engine step listener, runs them: it reads
the chips' hwmon files, writes ``cpufreq/scaling_max_freq`` and sets ``engine.batch_limit``. The
next step is priced exactly (``table.StepPricer``): DVFS levels are coarse and steps differ.

1. Energy, not power: the summed ``energy1_input`` gives each step and every window exactly.
2. Sigma-delta: a credit (J) integrates target (budget less ``margin``) minus measured power; each
   step runs at whichever of the two levels around the target brings it nearer zero. Prices are
   scaled by ``k`` (measured/predicted).
3. Hard limits first: 100 ms windows under the ceiling, 1 s windows under the budget (the old
   one before a change), no chip near its over-current rating.
4. Batch (every ``outer_s``, with hysteresis): the table's best limit at the target; at once when
   even the lowest clock at the current batch is over budget.
5. Guards: a bad or stale sensor or a governor error -> lowest clock and the table's safe batch
   until sensors read well for two ticks; a level that tripped over-current is avoided for
   ``oc_avoid_s``; near the thermal trip the target is derated.
6. Idle: lowest clock everywhere; nothing polls (the loop runs only when the engine steps).
7. ``energy_slack``: no step above the reference (best static) clock while a second credit,
   (1 + slack) x each step's price at the reference less the energy measured, is negative.
8. Batch-only work (every request running or queued has priority "batch"): the batch limit and
   clock with the fewest joules per token within the budget (``PowerTable.efficient_level``) and
   the engine's own prompt chunks; an interactive request switches back to speed at its first step.
"""

from __future__ import annotations

import bisect
import math
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgebox.power.budget import Budget
from edgebox.power.sensors import Reading, WrappingCounter, firmware_sensors
from edgebox.power.table import DECODE, PREFILL, PowerTable, Step
from firmware_stub import scratch_root

# --- configuration, inputs, state ---------------------------------------------------------------


@dataclass(frozen=True)
class GovernorConfig:
    table: PowerTable
    n_chips: int
    inner_s: float = 0.1  # tick period: sensors, guards (device seconds)
    outer_s: float = 1.0  # batch loop period
    margin: float = 0.025  # hold the mean this far under the budget (window noise)
    window_guard: float = 0.005  # the 1 s window cap sits this far under the budget
    short_guard: float = 0.99  # the next step's worst 100 ms window must fit this share of the ceiling
    credit_low_s: float = 0.1  # the credit stays within [-B x low, +B x high] seconds:
    credit_high_s: float = 0.02  # overspending is repaid; old underspending is forgotten
    k_gain: float = 0.2  # per step: how fast the model's scale follows measurements
    batch_up_gain: float = 0.03  # a larger batch limit must promise this much more tokens/s,
    batch_down_gain: float = 0.15  # a smaller one (it idles slots) this much
    throttle_c: float = 85.0  # thermal trip (the firmware's); derate below it
    thermal_guard_c: float = 5.0  # start derating this far under the trip
    over_current_w: float = math.inf  # per chip
    oc_avoid_s: float = 10.0  # after an over-current event, stay under the tripping level
    # energy per token at most this share above what the steps run would cost at the reference
    # clock (``reference_level``: the best static clock); None: spend the whole budget on speed,
    # whatever a token costs
    energy_slack: float | None = 0.03
    energy_start_s: float = 0.5  # the guard's allowance at the start and after a budget change (B x this J)
    energy_bank_s: float = 2.0  # saved energy (vs the slack) carried forward: <= B x this

    @classmethod
    def for_box(cls, box, max_batch: int = 16, context: int = 512, **overrides) -> GovernorConfig:
        p = box.profile
        return cls(
            table=PowerTable.from_box(box, max_batch, context),
            n_chips=box.n_chips,
            throttle_c=p.throttle_c,
            over_current_w=p.over_current_w,
            **overrides,
        )

    @property
    def levels_mhz(self) -> tuple[int, ...]:
        return self.table.levels_mhz

    @property
    def max_batch(self) -> int:
        return self.table.max_batch


@dataclass(frozen=True)
class Sample:
    """What the loop measures after every step."""

    t_s: float  # device time
    energy_j: float | None  # the box's energy (chips' counters summed, unwrapped); None: unreadable
    running: int  # sequences in the batch now
    queued: int  # sequences waiting for a slot
    # the steps the engine may run next (with and without admitting what is queued), the
    # likeliest last; None: unknown (any step at a typical context is assumed)
    next_steps: tuple[Step, ...] | None = None
    batch_only: bool = False  # every request running or queued is batch priority (rule 8)


@dataclass(frozen=True)
class Readings:
    """What ``decide`` gets at a tick: the step sample and every chip's full sensor reading."""

    t_s: float
    chips: tuple[Reading, ...]  # one per chip, in chip order
    running: int
    queued: int
    energy_j: float | None
    next_steps: tuple[Step, ...] | None = None
    batch_only: bool = False

    @property
    def sample(self) -> Sample:
        return Sample(self.t_s, self.energy_j, self.running, self.queued, self.next_steps, self.batch_only)


@dataclass(frozen=True)
class GovernorState:
    config: GovernorConfig
    batch_limit: int
    level: int = 0  # level in force
    log: tuple[tuple[float, float], ...] = ()  # (t, box energy J) after each step, last ~1.2 s
    credit_j: float = 0.0
    k: float = 1.0  # measured / predicted power of the last steps
    energy_credit_j: float = 0.0  # (1 + slack) x reference energy - energy spent, summed
    reference_j: float | None = None  # the step now running, priced at the reference clock
    batch: int = 1  # sequences in the step now running
    predicted_w: float | None = None  # the table's power for the step now running
    budget_w: float | None = None
    previous_budget: tuple[float, float] | None = None  # (changed at t, old watts): a window
    # reaching back before a change is allowed the old budget
    # for that part (the budget applies from when it is set)
    target_w: float | None = None  # what the mean is held at (budget less margin, derated)
    last_tick_s: float = -math.inf
    last_outer_s: float = -math.inf
    fault: bool = False
    good_ticks: int = 0
    idle: bool = False
    reasons: tuple[str, ...] = ()  # firmware throttle reasons last reported
    derating: bool = False
    oc_events: int | None = None
    oc_cap_level: int | None = None
    oc_until_s: float = -math.inf
    efficient: bool = False  # rule 8 in force (batch-only work)

    @classmethod
    def initial(cls, config: GovernorConfig, batch_limit: int | None = None) -> GovernorState:
        return cls(config=config, batch_limit=batch_limit or config.max_batch)

    @property
    def power_1s_w(self) -> float | None:
        return _window_w(self.log, 1.0)

    @property
    def power_100ms_w(self) -> float | None:
        return _window_w(self.log, 0.1)


@dataclass(frozen=True)
class Decision:
    freqs_mhz: tuple[int, ...]
    batch_limit: int
    events: tuple[dict, ...]
    state: GovernorState


# --- the pure control law -----------------------------------------------------------------------


def decide(readings: Readings, state: GovernorState, budget: Budget | float) -> Decision:
    """A tick: guards, protections, thermal, budget changes, the batch loop, then the clock for
    the next step (``modulate``).  Pure."""
    budget = budget if isinstance(budget, Budget) else Budget(float(budget))
    cfg, tab = state.config, state.config.table
    t = readings.t_s
    events: list[dict] = []
    lowest = (cfg.levels_mhz[0],) * cfg.n_chips

    def event(kind: str, **data) -> None:
        events.append({"t_s": round(t, 4), "kind": kind, **data})

    # a budget change applies from this step on; the old credit means nothing under it
    budget_changed = state.budget_w is not None and budget.watts != state.budget_w
    if budget_changed:
        event("budget", old_w=state.budget_w, new_w=budget.watts)
        state = replace(state, credit_j=0.0, previous_budget=(t, state.budget_w))
    if budget_changed or state.budget_w is None:
        state = replace(state, energy_credit_j=budget.watts * cfg.energy_start_s)
    state = replace(state, budget_w=budget.watts, last_tick_s=t)

    # idle: nothing to run -> lowest clocks; the next work starts a fresh measurement
    demand = readings.running + readings.queued
    if demand == 0:
        if not state.idle:
            event("idle")
        return Decision(lowest, state.batch_limit, tuple(events), replace(state, idle=True, log=(), credit_j=0.0, level=0))
    if state.idle:
        event("active")
        state = replace(state, idle=False)

    # guard: every chip must read sanely, with an energy counter (the budget is energy)
    bad = {r.source: list(r.problems) or ["no energy1_input"] for r in readings.chips if not r.valid or r.energy_j is None}
    if len(readings.chips) != cfg.n_chips:
        bad["sensors"] = [f"{len(readings.chips)} readings for {cfg.n_chips} chips"]
    if readings.energy_j is None and not bad:
        bad["energy"] = ["energy1_input unreadable"]
    if bad:
        safe_batch = _safe_batch(tab, budget, cfg)
        if not state.fault:
            event("sensor_fault", chips=bad, action=f"lowest clock {cfg.levels_mhz[0]} MHz, batch {safe_batch}")
        return Decision(
            lowest,
            safe_batch,
            tuple(events),
            replace(state, fault=True, good_ticks=0, log=(), credit_j=0.0, level=0, batch_limit=safe_batch),
        )
    if state.fault:
        if state.good_ticks + 1 < 2:  # one good reading is not yet trust
            return Decision(lowest, state.batch_limit, tuple(events), replace(state, good_ticks=state.good_ticks + 1, log=()))
        event("sensor_ok")
        state = replace(state, fault=False, good_ticks=0, last_outer_s=-math.inf)

    # firmware protections: report changes of reason; avoid a level that tripped over-current
    reasons = tuple(sorted({x for r in readings.chips for x in r.throttle_reasons}))
    if reasons != state.reasons:
        event(
            "throttled" if reasons else "unthrottled",
            reasons=list(reasons),
            chips={r.source: list(r.throttle_reasons) for r in readings.chips if r.throttle_reasons},
        )
    oc = sum(r.oc_events or 0 for r in readings.chips)
    oc_cap, oc_until = state.oc_cap_level, state.oc_until_s
    if state.oc_events is not None and oc > state.oc_events:
        oc_cap, oc_until = max(0, state.level - 1), t + cfg.oc_avoid_s
        event("over_current", events=oc - state.oc_events, avoid_above_mhz=cfg.levels_mhz[oc_cap])
    if oc_cap is not None and t >= oc_until:
        oc_cap = None
    state = replace(state, reasons=reasons, oc_events=oc, oc_cap_level=oc_cap, oc_until_s=oc_until)

    # thermal: derate the target as the hottest die nears the trip (the trip itself would hold
    # the lowest clock until the die cools by the hysteresis: tens of seconds at this RC)
    target_w = budget.watts * (1.0 - cfg.margin)
    temps = [r.temp_c for r in readings.chips if r.temp_c is not None]
    hottest = max(temps) if temps else None
    derate_from = cfg.throttle_c - cfg.thermal_guard_c
    derating = hottest is not None and hottest >= derate_from
    if derating:
        over = (hottest - derate_from) / cfg.thermal_guard_c  # 0 at the guard, 1 at the trip
        now_w = state.power_1s_w or target_w
        target_w = min(target_w, now_w * max(0.5, 1.0 - 0.1 * (1.0 + over)))
    if derating != state.derating:
        event("thermal_derate" if derating else "thermal_ok", temp_c=round(hottest, 2) if hottest is not None else None)
    state = replace(state, target_w=target_w, derating=derating)

    # batch-only work or not (rule 8): a change of mode runs the batch loop now
    mode_changed = readings.batch_only != state.efficient
    if mode_changed:
        event("efficient" if readings.batch_only else "speed")
        state = replace(state, efficient=readings.batch_only)

    # batch (outer loop): the table's best limit for the target, with hysteresis; the model
    # scale only counts when it says the table is optimistic (prompt phases read low)
    if budget_changed or mode_changed or t - state.last_outer_s >= cfg.outer_s:
        choose = _efficient_batch if state.efficient else _choose_batch
        new_limit = choose(state, budget, target_w / max(state.k, 1.0), demand, state.batch_limit)
        if new_limit != state.batch_limit:
            event("batch", old=state.batch_limit, new=new_limit)
        state = replace(state, batch_limit=new_limit, last_outer_s=t)

    d = modulate(readings.sample, state, budget)
    return Decision(d.freqs_mhz, d.batch_limit, tuple(events), d.state)


def modulate(sample: Sample, state: GovernorState, budget: Budget | float) -> Decision:
    """After a step: book its energy, then pick the clock for the next step.  Pure.

    The step the engine will run next (``sample.next_steps``; unknown: any step kind at a
    typical context) is priced at every level up to ``allowed_top``.  The two levels around the
    target are tried in sigma-delta order (the credit after the step nearer zero first), then
    lower ones; the first whose step keeps every 100 ms window ending in it under the ceiling
    and every 1 s window under the budget, given the energy measured so far, wins."""
    budget = budget if isinstance(budget, Budget) else Budget(float(budget))
    cfg, tab = state.config, state.config.table
    if state.fault or state.idle:
        return Decision((cfg.levels_mhz[0],) * cfg.n_chips, state.batch_limit, (), state)
    if sample.energy_j is None:  # the tick will judge the sensors
        return Decision((cfg.levels_mhz[state.level],) * cfg.n_chips, state.batch_limit, (), state)
    t, target_w = sample.t_s, state.target_w or budget.watts * (1.0 - cfg.margin)

    # book the step just run: its energy against the credit and against the table (k)
    log, credit, k, energy_credit = state.log, state.credit_j, state.k, state.energy_credit_j
    dt = 0.0
    if log and t > log[-1][0]:
        dt = t - log[-1][0]
        spent = sample.energy_j - log[-1][1]
        predicted_w = state.predicted_w if state.predicted_w is not None else tab.power(state.level, state.batch)
        if predicted_w > 0 and spent >= 0:
            k = min(2.0, max(0.3, k + cfg.k_gain * (spent / (predicted_w * dt) - k)))
        credit += target_w * dt - spent
        credit = min(budget.watts * cfg.credit_high_s, max(-budget.watts * cfg.credit_low_s, credit))
        if state.reference_j is not None and cfg.energy_slack is not None and spent >= 0:
            energy_credit = min(
                budget.watts * cfg.energy_bank_s,
                max(-budget.watts * cfg.credit_low_s, energy_credit + (1.0 + cfg.energy_slack) * state.reference_j - spent),
            )
    if not log or t > log[-1][0]:
        log = _trim(log + ((t, sample.energy_j),), t, budget.long_s + 0.2)

    # the next step: every level up to the top, if the steps it may run fit both windows and no
    # chip's over-current rating; the sigma-delta pick among them, priced as the likeliest step
    batch = max(1, min(sample.running + sample.queued, state.batch_limit))
    top = allowed_top(state, budget, batch, exact=sample.next_steps is not None)
    ceiling_j = _allowance_j(state, budget.short_watts, budget.short_factor, t, budget.short_s) * cfg.short_guard
    window_j = _allowance_j(state, budget.watts, 1.0, t, budget.long_s) * (1.0 - cfg.window_guard)
    oc_w = cfg.over_current_w * cfg.short_guard
    if sample.next_steps is not None:
        priced = [tab.pricer.price(step) for step in sample.next_steps]
    lt = np.fromiter((x[0] for x in log), float, len(log))
    le = np.fromiter((x[1] for x in log), float, len(log))

    def shapes_at(lv: int) -> list[tuple[float, float, float]]:
        if sample.next_steps is not None:
            return [(float(x.step_s[lv]), float(x.power_w[lv]), float(x.busy_w[lv])) for x in priced]
        # unknown: any step kind at the typical context, the likeliest (decode) last
        return list(tab.any_step(lv, batch)) + [tab.any_step(lv, batch)[0]]

    def fits(lv: int) -> bool:
        if lv == 0:
            return True  # nothing lower to go to
        if sample.next_steps is not None and max(float(x.chip_peak_w[lv]) for x in priced) > oc_w:
            return False
        shapes = shapes_at(lv)
        # the ceiling is checked against the model scaled up by k when it has been reading low
        # lately (never down: one cheap step is no promise about the next)
        up = max(k, 1.0)
        return (
            _peak_window_j(lt, le, t, budget.short_s, [(s_, up * w, up * bw) for s_, w, bw in shapes]) <= ceiling_j
            and _peak_window_j(lt, le, t, budget.long_s, [(s_, k * w, k * bw) for s_, w, bw in shapes]) <= window_j
        )

    # the sigma-delta order: levels by how near they bring the credit to zero; the first that
    # fits the windows wins
    def err(lv: int) -> float:
        d, p_w, _ = shapes_at(lv)[-1]
        return abs(credit + (target_w - k * p_w) * d)

    # the efficiency guard: above the reference clock only while the energy spent stays within
    # the slack of what the reference clock would have spent on the same steps
    reference = reference_level(tab, budget, batch)
    if cfg.energy_slack is not None and energy_credit < 0:
        top = min(top, reference)
    if state.efficient:  # rule 8: never above the clock with the fewest joules per token
        top = min(top, tab.efficient_level(batch))
    # only the two levels around the target take part: a mean power is cheapest as a mix of
    # neighbours (energy per token is convex in the clock), so a big credit is not spent at a
    # far higher, less efficient level
    below = max([lv for lv in range(top + 1) if k * shapes_at(lv)[-1][1] <= target_w] or [0])
    pair = sorted({below, min(below + 1, top)}, key=err)
    order = pair + list(range(min(pair) - 1, -1, -1))
    best = next((lv for lv in order if fits(lv)), 0)
    best_w = shapes_at(best)[-1][1]
    ref_s, ref_w, _ = shapes_at(reference)[-1]
    new = replace(
        state,
        level=best,
        log=log,
        credit_j=credit,
        k=k,
        batch=batch,
        predicted_w=best_w,
        energy_credit_j=energy_credit,
        reference_j=k * ref_s * ref_w,
    )
    return Decision((cfg.levels_mhz[best],) * cfg.n_chips, state.batch_limit, (), new)


def reference_level(tab: PowerTable, budget: Budget, batch: int) -> int:
    """The best static clock for ``batch``: the highest level at which steady decode at that
    batch draws no more than the budget and a prompt chunk beside it no more than the 100 ms
    ceiling (the table's prices; decode is most of the time, a chunk a short part of a window)."""
    fit = [
        lv
        for lv in range(tab.n_levels)
        if tab.power(lv, batch, DECODE) <= budget.watts and tab.power(lv, batch, PREFILL) <= budget.short_watts
    ]
    return fit[-1] if fit else 0


def allowed_top(state: GovernorState, budget: Budget, batch: int, exact: bool = False) -> int:
    """The highest level that may run at all: no recent over-current event forbids it, and
    (unless ``exact``: the caller checks the step it knows) no chip's peak over any step at
    this batch nears its over-current rating.  (Whether a level fits the 100 ms ceiling depends
    on what ran before: ``modulate`` checks that per step.)"""
    cfg, tab = state.config, state.config.table
    top = tab.n_levels - 1
    if not exact:
        top = 0
        for lv in range(1, tab.n_levels):
            if tab.chip_peak(lv, batch) <= cfg.over_current_w * cfg.short_guard:
                top = lv
    return top if state.oc_cap_level is None else min(top, state.oc_cap_level)


def _allowance_j(state: GovernorState, watts: float, factor: float, t: float, window_s: float) -> float:
    """Energy a window of ``window_s`` ending at ``t`` may hold: ``watts`` x the window, except
    that the part of it before the last budget change is allowed the old budget (x factor).
    Conservative for the windows ending later in the next step (they reach less far back)."""
    allowed = watts * window_s
    if state.previous_budget is not None:
        since, old_w = state.previous_budget
        before = min(max(since - (t - window_s), 0.0), window_s)
        allowed += (old_w * factor - watts) * before
    return allowed


def _trim(log: tuple, t: float, span_s: float) -> tuple:
    """Drop entries older than span_s, keeping one at or before the horizon."""
    times = [x[0] for x in log]
    cut = bisect.bisect_right(times, t - span_s) - 1
    return log[cut:] if cut > 0 else log


def _energy_at(log: tuple, t: float) -> float:
    times = [x[0] for x in log]
    if t <= times[0]:
        return log[0][1]  # before the first entry nothing known was spent
    i = bisect.bisect_left(times, t)
    if i >= len(log):
        return log[-1][1]
    (t0, e0), (t1, e1) = log[i - 1], log[i]
    return e0 + (e1 - e0) * (t - t0) / (t1 - t0) if t1 > t0 else e1


def _energy_in(log: tuple, t: float, window_s: float) -> float:
    """Energy spent in [t - window_s, t] as far as the log knows (0 before its first entry)."""
    if not log or window_s <= 0:
        return 0.0
    return _energy_at(log, t) - _energy_at(log, t - window_s)


def _peak_window_j(lt: np.ndarray, le: np.ndarray, t: float, window_s: float, shapes) -> float:
    """The most energy any window of ``window_s`` ending during the next step can hold, over the
    (seconds, mean watts, busy watts) shapes that step may have; ``lt``, ``le``: the energy log.

    A window ending ``tau`` into the step holds the log's last (window - tau) seconds plus the
    step's first tau seconds, at most min(tau x busy watts, the whole step's energy): a chip
    that waits for the others idles first, so the step's power is not flat.  Between log
    entries the window's start loses energy at a constant rate, so the maximum is at the step's
    end, at a log crossing, or where the step's bound turns flat."""
    if not len(lt):
        return max(min(min(s, window_s) * bw, s * w) for s, w, bw in shapes)
    now = float(np.interp(t, lt, le))
    start = t - window_s
    worst = 0.0
    for s, w, bw in shapes:
        on = min(s, window_s)
        total = s * w
        knee = total / bw if bw > 0 else on
        taus = np.append(lt[(lt > start) & (lt < start + on)] - start, [on, min(on, knee)])
        step_j = np.minimum(taus * bw, total)
        worst = max(worst, float(np.max(now - np.interp(start + taus, lt, le) + step_j)))
    return worst


def _window_w(log: tuple, window_s: float) -> float | None:
    if len(log) < 2:
        return None
    return _energy_in(log, log[-1][0], window_s) / window_s


def _safe_batch(tab: PowerTable, budget: Budget, cfg: GovernorConfig) -> int:
    """With no trustworthy sensor: the largest batch whose steps at the lowest clock fit."""
    fit = [
        b
        for b in range(1, tab.max_batch + 1)
        if max(tab.power(0, b, DECODE), tab.power(0, b, PREFILL)) <= budget.watts * (1 - cfg.margin)
    ]
    return fit[-1] if fit else 1


def _choose_batch(state: GovernorState, budget: Budget, target_w: float, demand: int, current: int) -> int:
    """The batch limit with the most predicted tokens/s at ``target_w`` (table watts), with
    hysteresis; every limit >= demand runs the same, so the best of those is reported as max."""
    cfg, tab = state.config, state.config.table

    def tokens(limit: int) -> float | None:
        b = max(1, min(limit, demand))
        return tab.mix_tokens(target_w, b, allowed_top(state, budget, b))

    scores = {b: tokens(b) for b in range(1, tab.max_batch + 1)}
    feasible = {b: s for b, s in scores.items() if s is not None}
    if not feasible:
        return 1  # nothing fits: the smallest batch, the clock at the bottom
    best = max(feasible, key=lambda b: (round(feasible[b], 9), b))
    if best >= demand:
        best = tab.max_batch
    now = scores.get(current)
    if now is None:
        return best
    gain = cfg.batch_up_gain if best > current else cfg.batch_down_gain
    return best if feasible[best] > now * (1 + gain) else current


def _efficient_batch(state: GovernorState, budget: Budget, target_w: float, demand: int, current: int) -> int:
    """Rule 8: the batch limit with the fewest predicted joules per token, each batch at its
    most efficient clock or the highest under ``target_w`` if that is lower; every limit >=
    demand runs the same, so the best of those is reported as max."""
    tab = state.config.table

    def joules_per_token(limit: int) -> float | None:
        b = max(1, min(limit, demand))
        fit = [lv for lv in range(tab.efficient_level(b) + 1) if tab.power(lv, b) <= target_w]
        return tab.power(fit[-1], b) / tab.tokens(fit[-1], b) if fit else None

    scores = {b: joules_per_token(b) for b in range(1, tab.max_batch + 1)}
    feasible = {b: j for b, j in scores.items() if j is not None}
    if not feasible:
        return 1
    best = min(feasible, key=lambda b: (round(feasible[b], 12), -b))
    return tab.max_batch if best >= demand else best


# --- the loop -----------------------------------------------------------------------------------


class EnergyCounters:
    """The chips' ``energy1_input`` counters, read after every step (one small file per chip,
    kept open and read with pread, as sysfs allows) and unwrapped: the box's energy in joules
    since the first read, or None if any is unreadable (the tick's full readings say why)."""

    def __init__(self, hwmon_dirs: list[Path]):
        self.files = [Path(d) / "energy1_input" for d in hwmon_dirs]
        self.fds: list[int | None] = [None] * len(self.files)
        self.counters: list[WrappingCounter | None] = [None] * len(self.files)

    def read(self) -> float | None:
        total = 0
        for i, f in enumerate(self.files):
            try:
                if self.fds[i] is None:
                    self.fds[i] = os.open(f, os.O_RDONLY)
                raw = int(os.pread(self.fds[i], 32, 0))
            except (OSError, ValueError):
                self._reopen(i)
                return None
            c = self.counters[i]
            if c is None:
                try:
                    range_uj = int((f.parent / "energy1_max_range_uj").read_bytes()[:32])
                except (OSError, ValueError):
                    range_uj = 2**64
                c = self.counters[i] = WrappingCounter(range_uj)
            c.update(raw)
            total += c.total
        return total * 1e-6

    def _reopen(self, i: int) -> None:
        fd, self.fds[i] = self.fds[i], None  # the file may have been replaced: open it anew next time
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        for i in range(len(self.fds)):
            self._reopen(i)


# prompt rows per step while governed: short steps keep the 1 s window within +-2 % (docstring above)
DEFAULT_PROMPT_CHUNK = 32


class PowerGovernor:
    """The governor attached to an engine; implements the daemon's ``PowerControl``.

    ``box``: the model's ``Box``.  Its firmware must publish a tree; an in-process firmware
    without one is replaced, before any step runs, by one publishing under ``fw_root`` (or a
    temporary directory).  ``set_budget`` may be called from any thread; it applies at the next
    step.  ``prompt_chunk``: while attached, cap the engine's prompt rows per step at this
    (restored by ``close``); None leaves the engine's own.  Other keywords: ``GovernorConfig``.
    """

    def __init__(
        self,
        box,
        budget_w: float = 10.0,
        *,
        max_batch: int = 16,
        fw_root: Path | str | None = None,
        context: int = 512,
        publish_interval_s: float = 0.02,
        keep_trace: bool = False,
        prompt_chunk: int | None = DEFAULT_PROMPT_CHUNK,
        **config,
    ):
        self.box = box
        self.prompt_chunk = prompt_chunk
        self._engine_chunk: int | None = None  # the engine's own prompt chunk, while capped
        self.budget = Budget(budget_w)
        fw = box.firmware
        if getattr(fw, "root", None) is None:
            if fw_root is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="edgebox-fw-", dir=scratch_root())
                fw_root = self._tmp.name
            fw = box.publish_firmware(fw_root, publish_interval_s)
        self.firmware = fw
        self.root = Path(fw.root)
        clock = lambda: box.clock_s  # noqa: E731  (sensors are stamped in device time)
        # a chip reading over 10x its over-current rating is a broken sensor, not a load
        self.sensors = firmware_sensors(self.root, clock=clock, max_power_w=10 * box.profile.over_current_w)
        self.energy = EnergyCounters([s.dir for s in self.sensors])
        self.config = GovernorConfig.for_box(box, max_batch, context, **config)
        self.state = GovernorState.initial(self.config, max_batch)
        self.events: list[dict] = []
        self.trace: list[tuple[float, int, int]] | None = [] if keep_trace else None
        self.engine = None
        self._lock = threading.Lock()
        self._written: list[int | None] = [None] * box.n_chips
        self._force_tick = False

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self, engine) -> PowerGovernor:
        self.engine = engine
        engine.batch_limit = self.state.batch_limit
        if self.prompt_chunk is not None and engine.prefill_chunk > self.prompt_chunk:
            self._engine_chunk, engine.prefill_chunk = engine.prefill_chunk, self.prompt_chunk
        if engine.prefill_chunk != self.config.table.prefill_chunk:
            cfg = self.config
            table = PowerTable.from_box(self.box, cfg.max_batch, cfg.table.context, prefill_chunk=engine.prefill_chunk)
            self.config = replace(cfg, table=table)
            self.state = replace(self.state, config=self.config)
        self._prime()
        engine.add_step_listener(self.on_step)
        return self

    def _prime(self) -> None:
        """Start the counters now and set the clock the first step runs at (the listener runs
        only after a step): the table's choice for one prompt chunk."""
        self._publish()
        for s in self.sensors:
            s.read()
        e = self.energy.read()
        t, tab = self.box.clock_s, self.config.table
        target = self.budget.watts * (1 - self.config.margin)
        level = max([lv for lv in range(tab.n_levels) if tab.power(lv, 1, PREFILL) <= target] or [0])
        level = min(level, allowed_top(self.state, self.budget, 1))
        self.state = replace(
            self.state,
            log=((t, e),) if e is not None else (),
            level=level,
            batch=1,
            budget_w=self.budget.watts,
            target_w=target,
            energy_credit_j=self.budget.watts * self.config.energy_start_s,
        )
        self._apply(Decision((self.config.levels_mhz[level],) * self.box.n_chips, self.state.batch_limit, (), self.state), None)

    def set_budget(self, watts: float) -> None:
        """Hold average power at or below ``watts`` from the next step (ValueError if not > 0)."""
        b = self.budget.with_watts(float(watts))
        with self._lock:
            self.budget = b
            self._force_tick = True

    def on_step(self, engine) -> None:
        """The step listener (scheduler thread): measure, then tick or modulate.  It never
        raises into the engine: a failure here puts the chips at the lowest clock and says why."""
        try:
            self._on_step(engine)
        except Exception as e:  # noqa: BLE001  (a governor bug must not fail the requests)
            lowest = (self.config.levels_mhz[0],) * self.box.n_chips
            with self._lock:
                first = not self.state.fault
                self.state = replace(self.state, fault=True, level=0, log=(), good_ticks=0)
                if first:
                    self.events.append(
                        {
                            "t_s": round(self.box.clock_s, 4),
                            "kind": "governor_error",
                            "error": f"{type(e).__name__}: {e}",
                            "action": "lowest clock",
                        }
                    )
            try:
                self._apply(Decision(lowest, self.state.batch_limit, (), self.state), None)
            except Exception:  # noqa: BLE001  (the files are gone: nothing more to do here)
                pass

    def _on_step(self, engine) -> None:
        running, queued, next_steps = _load_of(engine)
        self._publish()
        t = self.box.clock_s
        energy = self.energy.read()
        with self._lock:
            budget, force = self.budget, self._force_tick
            self._force_tick = False
        s = self.state
        batch_only = getattr(engine, "work_class", None) == "batch"
        if force or batch_only != s.efficient or t - s.last_tick_s >= self.config.inner_s or running + queued == 0 or s.fault:
            readings = Readings(t, tuple(x.read() for x in self.sensors), running, queued, energy, next_steps, batch_only)
            d = decide(readings, s, budget)
        else:
            d = modulate(Sample(t, energy, running, queued, next_steps, batch_only), s, budget)
        self._apply(d, engine)
        with self._lock:
            self.state = d.state
            self.events.extend(d.events)
        if self.trace is not None:
            self.trace.append((t, d.freqs_mhz[0], d.batch_limit))

    def _publish(self) -> None:
        # the in-process stub publishes on its own device-time ticks; a board's power monitor
        # converts continuously, so a read after a step sees that step: ask the stub to publish
        publish = getattr(self.firmware, "publish", None)
        if publish is not None:
            publish()

    def _apply(self, d: Decision, engine) -> None:
        changed = False
        for chip, mhz in enumerate(d.freqs_mhz):
            if self._written[chip] != mhz:
                path = self.root / f"chip{chip}" / "cpufreq" / "scaling_max_freq"
                path.write_text(f"{mhz * 1000}\n")
                self._written[chip] = mhz
                changed = True
        if changed:
            self._publish()  # a cpufreq write takes effect at once on a board
        if engine is not None and engine.batch_limit != d.batch_limit:
            engine.batch_limit = d.batch_limit
        if engine is not None and self._engine_chunk is not None:
            # rule 8: batch-only work reads prompts in the engine's own (larger) chunks: the
            # weights are streamed once per chunk, and nobody waits behind a long step
            chunk = self._engine_chunk if d.state.efficient else self.prompt_chunk
            if engine.prefill_chunk != chunk:
                engine.prefill_chunk = chunk

    # -- PowerControl ---------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            s, budget = self.state, self.budget
            recent = self.events[-10:]
        return {
            "budget_w": budget.watts,
            "short_ceiling_w": budget.short_watts,
            "target_w": _r(s.target_w),
            "power_1s_w": _r(s.power_1s_w),
            "power_100ms_w": _r(s.power_100ms_w),
            "freq_mhz": self.config.levels_mhz[s.level],
            "batch_limit": s.batch_limit,
            "model_scale": _r(s.k),
            "mode": "efficient" if s.efficient else "speed",  # rule 8
            "reference_mhz": self.config.levels_mhz[reference_level(self.config.table, budget, s.batch)],
            "energy_credit_j": _r(s.energy_credit_j),
            "sensor_fault": s.fault,
            "idle": s.idle,
            "throttle_reasons": list(s.reasons),
            "thermal_derate": s.derating,
            "recent_events": recent,
        }

    def close(self) -> None:
        if self._engine_chunk is not None and self.engine is not None:
            self.engine.prefill_chunk, self._engine_chunk = self._engine_chunk, None
        self.energy.close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()


def _load_of(engine) -> tuple[int, int, tuple[Step, ...] | None]:
    """(running, queued, the step the engine will run next) after a step, from the engine's
    public ``Engine.load()``: the listener runs on the scheduler thread, between steps, where
    it is exact (a request submitted from another thread before the next step starts is the
    one thing it cannot see)."""
    running, queued, segments = engine.load()
    return running, queued, (_step_of(segments),) if segments else None


def _step_of(segments) -> Step:
    """A step from its segments, as ``Box.account_step`` takes them: (rows, context after)."""
    return Step(sum(n for n, _ in segments), sum(n * c for n, c in segments), sum(c for _, c in segments), len(segments))


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)

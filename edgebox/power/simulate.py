"""``edgebox power simulate``: N concurrent generation streams for S seconds of device time.

A dry run (no math): the real scheduler, the chips' device time, the firmware's physics and the
governor run exactly; only the matrix products are skipped, so a minute of device time on the
full 7B shape takes a few seconds of wall time.  Deterministic: the same options give the same
JSON, because every request after the first is submitted on the scheduler thread itself (from
the step listener and the request's completion callback), never racing it.

Workload: stream i is a sequence of requests, back to back, each with a prompt of
``prompt_tokens`` (a seeded uniform draw) and ``gen_tokens`` to generate, so N sequences are
always wanted; the batch limit (the governor's, or ``--batch``) decides how many run at once.
With ``mix`` (``--mix I:B``) the B streams are background work of priority "batch" and I
interactive users each send a short request, wait for its reply, think for an exponential
``think_s`` (device time, seeded) and send the next; ``scheduler="fifo"`` sends every request as
interactive (priorities off: first come, first served), the baseline the priorities are judged
against.  Per class: time to first token (device s), tokens/s and J/token (the requests' own
energy, ``engine.energy``).

What is measured is the ground truth, not the governor's view: the firmware is wrapped so that
every activity or idle report (constant power inside each) is logged per chip, and the box's
energy curve is their sum.  The governor meanwhile sees only the hwmon files.

Output: ``SimResult`` (``to_dict()`` is the ``--json`` form): 1 s and 100 ms windows, tokens/s,
J/token, time per clock level and batch limit, events, the budget report, the settling per budget
step.
"""

from __future__ import annotations

import bisect
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgebox.engine import Engine, Request, Summary
from edgebox.power.budget import Budget, EnergyLog, Timeline, check
from edgebox.power.governor import PowerGovernor
from firmware_stub import Firmware, scratch_root

WARMUP_S = 2.0  # 1 s windows ending before this are not judged (the first prompts are read)
SETTLE_S = 2.0  # nor those ending this soon after a budget step (the settle time is reported)


@dataclass(frozen=True)
class SimOptions:
    streams: int = 4
    seconds: float = 60.0
    budget_w: float = 10.0
    budget_steps: tuple[tuple[float, float], ...] = ()  # (at device second, new watts)
    governor: bool = True
    freq_mhz: int | None = None  # static clock cap (governor off); None: the top level
    batch: int | None = None  # static batch limit (governor off); None: max_batch
    max_batch: int = 16
    prompt_chunk: int | None = None  # prompt rows per step: the governor caps the engine's at this
    # (a knob it turns); with the governor off, the engine's own
    governor_config: dict = field(default_factory=dict)  # GovernorConfig overrides (energy_slack, ...)
    prompt_tokens: tuple[int, int] = (200, 400)
    gen_tokens: tuple[int, int] = (200, 400)
    seed: int = 0
    publish_interval_s: float = 0.05  # the firmware's own sensor update period (device time); the
    # governor also has it publish after every step it reads
    interactive: int = 0  # interactive users (with ``streams`` then batch-priority streams)
    think_s: float = 3.0  # an interactive user's mean pause between a reply and the next request
    interactive_prompt_tokens: tuple[int, int] = (40, 120)
    interactive_gen_tokens: tuple[int, int] = (32, 96)
    scheduler: str = "priority"  # or "fifo": every request interactive, first come first served
    batch_priority: bool = False  # the streams are batch work (set by ``--mix``)

    def __post_init__(self) -> None:
        if self.streams < 0 or self.streams + self.interactive < 1 or self.seconds <= 0 or self.max_batch < 1:
            raise ValueError("simulate: streams >= 1, seconds > 0 and max_batch >= 1 required")
        if self.governor and (self.freq_mhz is not None or self.batch is not None):
            raise ValueError("simulate: --freq and --batch are static settings: use them with --governor off")
        if self.interactive < 0 or self.think_s <= 0:
            raise ValueError("simulate: interactive users >= 0 and think_s > 0 required")
        if self.scheduler not in ("priority", "fifo"):
            raise ValueError(f"simulate: --scheduler takes priority or fifo, got {self.scheduler!r}")
        if self.prompt_chunk is not None and self.prompt_chunk < 1:
            raise ValueError("simulate: --prompt-chunk must be >= 1")
        if self.batch is not None and not 1 <= self.batch <= self.max_batch:
            raise ValueError(f"simulate: --batch must be in 1..{self.max_batch}")
        Budget(self.budget_w)
        for at, w in self.budget_steps:
            Budget(w)
            if not 0 <= at:
                raise ValueError(f"simulate: budget step at {at} s")


def parse_mix(text: str | None) -> tuple[int, int] | None:
    """ "2:8" -> (2 interactive users, 8 batch streams)."""
    if not text:
        return None
    try:
        i, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--mix: {text!r} is not INTERACTIVE:BATCH (e.g. 2:8)") from None
    if i < 0 or b < 0 or i + b == 0:
        raise ValueError(f"--mix: {text!r}: counts >= 0, not both 0")
    return i, b


def parse_budget_steps(text: str | None) -> tuple[tuple[float, float], ...]:
    """ "20:7,40:10" -> ((20.0, 7.0), (40.0, 10.0))."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        try:
            at, watts = part.split(":")
            out.append((float(at), float(watts)))
        except ValueError:
            raise ValueError(f"--budget-steps: {part!r} is not SECONDS:WATTS (e.g. 20:7,40:10)") from None
    return tuple(sorted(out))


class TracingFirmware(Firmware):
    """The firmware stub, also logging each chip's (device time, energy) after every report."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace_t: list[list[float]] = [[0.0] for _ in range(self.n_chips)]
        self.trace_e: list[list[float]] = [[0.0] for _ in range(self.n_chips)]

    def _log(self, chip: int) -> None:
        s = self.state(chip)
        self.trace_t[chip].append(s.time_s)
        self.trace_e[chip].append(s.energy_j)

    def activity(self, chip: int, seconds: float, *args, **kwargs) -> None:
        super().activity(chip, seconds, *args, **kwargs)
        self._log(chip)

    def idle(self, chip: int, seconds: float) -> None:
        super().idle(chip, seconds)
        self._log(chip)

    def box_log(self) -> EnergyLog:
        """The box's energy curve: every chip's (piecewise linear) curve summed on the union of
        their report times."""
        grid = np.unique(np.concatenate([np.asarray(t) for t in self.trace_t]))
        total = sum(np.interp(grid, np.asarray(t), np.asarray(e)) for t, e in zip(self.trace_t, self.trace_e))
        return EnergyLog(t=grid.tolist(), e=np.asarray(total).tolist())


@dataclass
class SimResult:
    options: dict
    model: str
    device_s: float
    wall_s: float
    tokens: int
    tokens_per_s: float
    energy_j: float
    joules_per_token: float
    mean_power_w: float
    windows_w: list[float]
    short_windows_w: list[float]
    tokens_per_s_series: list[float]
    freq_levels_mhz: list[int]
    freq_time_s: dict
    batch_time_s: dict
    events: list[dict]
    report: dict  # rolling windows vs the budget (after the warm-up and settles)
    settle: list[dict]  # per budget step
    protections: dict  # firmware: over-current and thermal events per chip
    max_temp_c: float
    log: EnergyLog | None = field(default=None, repr=False)  # the box's energy curve (not in JSON)
    token_log: tuple | None = field(default=None, repr=False)  # (device s, tokens) after every step (not in JSON)
    classes: dict = field(default_factory=dict)  # per priority class: requests, TTFT, tokens/s, J/token

    def to_dict(self) -> dict:
        d = asdict(replace(self, log=None, token_log=None))
        d.pop("log")
        d.pop("token_log")
        return d

    def at_tokens(self, n: int) -> tuple[float, int, float]:
        """(device s, tokens, joules) at the end of the first step by which ``n`` tokens were
        generated (or the run's end): the same work as another run's first ``n`` tokens.  With
        the same batch limit throughout, two runs of the same workload run the same steps
        whatever their clocks, so this compares equal work exactly."""
        t, tokens = self.token_log
        i = bisect.bisect_left(tokens, n)
        if i >= len(tokens):
            return self.device_s, self.tokens, self.energy_j
        return t[i], tokens[i], self.log.energy_at(t[i])


def simulate(make_model: Callable[[], object], opts: SimOptions) -> SimResult:
    """Run one simulation.  ``make_model()`` returns a fresh dry-run model (``ShapeModel`` or a
    loaded ``Model``): device time starts at zero."""
    wall0 = time.perf_counter()
    model = make_model()
    box = model.box
    with tempfile.TemporaryDirectory(prefix="edgebox-sim-", dir=scratch_root()) as root:
        fw = TracingFirmware(box.profile, box.n_chips, root=root, publish_interval_s=opts.publish_interval_s)
        box.firmware = fw
        p = box.profile
        max_batch = opts.max_batch if opts.governor else (opts.batch or opts.max_batch)
        chunk = {"prefill_chunk": opts.prompt_chunk} if opts.prompt_chunk and not opts.governor else {}
        engine = Engine(
            model, max_batch=max_batch, dry_run=True, max_queue=max(64, 4 * opts.streams), kv_budget_bytes=None, **chunk
        )
        # the workload's listener goes first: it books each step to the clock the step ran at,
        # before the governor changes it
        run = _Run(engine, box, opts)
        gov = None
        if opts.governor:
            chunk = {"prompt_chunk": opts.prompt_chunk} if opts.prompt_chunk else {}  # else the governor's default
            gov = PowerGovernor(box, opts.budget_w, max_batch=opts.max_batch, keep_trace=True, **chunk, **opts.governor_config)
            gov.attach(engine)
            run.gov = gov
            engine.add_step_listener(run.after_governor)
        else:
            cap = opts.freq_mhz if opts.freq_mhz is not None else p.max_mhz
            for chip in range(box.n_chips):
                fw.set_max_freq(chip, int(cap))
        try:
            run.start()
            if not run.done.wait(timeout=max(600.0, opts.seconds * 20)):
                raise TimeoutError("simulate: the engine stopped advancing device time")
        finally:
            engine.close(drain=False)
            if gov is not None:
                gov.close()
        if run.error is not None:
            raise run.error
        log = fw.box_log()
        states = [fw.state(c) for c in range(box.n_chips)]
        fw.close()
    wall = time.perf_counter() - wall0
    return _result(model, opts, run, log, gov, states, wall)


class _Run:
    """The workload and the clock watcher, all on the scheduler thread after the first submit."""

    def __init__(self, engine: Engine, box, opts: SimOptions):
        self.engine, self.box, self.opts = engine, box, opts
        self.gov: PowerGovernor | None = None
        self.rngs = [random.Random(opts.seed * 1000 + i) for i in range(opts.streams)]
        self.done = threading.Event()
        self.stopped = False
        self.started = False
        self.error: BaseException | None = None
        self.n_events: int | None = None  # the governor's events in the run
        self.tokens_at: list[tuple[float, int]] = [(0.0, 0)]  # (device s, tokens) each second
        self.step_t: list[float] = []  # after every step: device s,
        self.step_tokens: list[int] = []  # tokens generated so far
        self.final_tokens = 0
        self.final_s = 0.0
        self.level_time: dict[int, float] = {}
        self.batch_time: dict[int, float] = {}
        self.last_t = 0.0
        self.steps = sorted(opts.budget_steps)
        self.next_step = 0
        self.handles = []
        self.n_requests = 0
        self.applied: list[tuple[float, float]] = []  # (device s, watts): budget steps as applied
        # interactive users: their own seeded draws, the device time of each one's next request
        self.users = [random.Random(opts.seed * 1000 + 500 + i) for i in range(opts.interactive)]
        self.next_at: list[float | None] = [u.expovariate(1.0 / opts.think_s) for u in self.users]
        self.summaries: list[tuple[str, Summary]] = []  # (class, final reply) of every request
        self.stream_class = "batch" if opts.batch_priority else "interactive"
        engine.add_step_listener(self.on_step)

    def request(self, stream: int, rng: random.Random, prompt_tokens, gen_tokens, priority: str) -> Request:
        n_prompt = rng.randint(*prompt_tokens)
        self.n_requests += 1
        # distinct first words: no two prompts share a prefix, so the engine's prompt cache (which
        # would skip prefill and copy KV pages) never hits, as with real users' prompts
        words = [f"s{stream}r{self.n_requests}"] + ["w"] * (n_prompt - 1)
        return Request(prompt=" ".join(words), max_tokens=rng.randint(*gen_tokens), priority=priority)

    def _priority(self, cls: str) -> str:
        return "interactive" if self.opts.scheduler == "fifo" else cls

    def submit(self, stream: int) -> None:
        def on_event(ev, stream=stream):
            if isinstance(ev, Summary):
                self.summaries.append((self.stream_class, ev))
                if not self.stopped:
                    self.submit(stream)

        o = self.opts
        r = self.request(stream, self.rngs[stream], o.prompt_tokens, o.gen_tokens, self._priority(self.stream_class))
        self.handles.append(self.engine.submit(r, on_event=on_event))

    def submit_interactive(self, user: int) -> None:
        def on_event(ev, user=user):
            if isinstance(ev, Summary):
                self.summaries.append(("interactive", ev))
                self.next_at[user] = self.box.clock_s + self.users[user].expovariate(1.0 / self.opts.think_s)

        o = self.opts
        self.next_at[user] = None  # waiting for its reply
        r = self.request(1000 + user, self.users[user], o.interactive_prompt_tokens, o.interactive_gen_tokens, "interactive")
        self.handles.append(self.engine.submit(r, on_event=on_event))

    def arrivals(self, engine: Engine) -> None:
        """Interactive users whose pause is over send their request; with nothing to run, the
        chips idle until the next one does."""
        due = [u for u, at in enumerate(self.next_at) if at is not None and at <= self.box.clock_s]
        if not due and not engine.work_class:
            waiting = [(at, u) for u, at in enumerate(self.next_at) if at is not None]
            if waiting:
                at, user = min(waiting)
                self.box.idle_until(at)
                due = [user]
        for u in due:
            self.submit_interactive(u)

    def start(self) -> None:
        if self.opts.streams:
            self.submit(0)  # the rest join from the first step's listener
        else:
            self.arrivals(self.engine)

    def on_step(self, engine: Engine) -> None:
        if self.stopped:
            return
        try:
            self._on_step(engine)
        except BaseException as e:  # surface listener bugs instead of hanging the run
            self.error = e
            self._stop()

    def _on_step(self, engine: Engine) -> None:
        if not self.started:
            self.started = True
            for s in range(1, self.opts.streams):
                self.submit(s)
        self.arrivals(engine)
        t = self.box.clock_s
        dt = t - self.last_t
        # the clock the step ran at (the governor listener runs after this one) and its batch
        f = self.box.firmware.freq_mhz(0)
        self.level_time[f] = self.level_time.get(f, 0.0) + dt
        b = engine.batch_limit
        self.batch_time[b] = self.batch_time.get(b, 0.0) + dt
        self.last_t = t
        self.step_t.append(t)
        self.step_tokens.append(engine.stats().generated_tokens)
        while self.next_step < len(self.steps) and t >= self.steps[self.next_step][0]:
            watts = self.steps[self.next_step][1]
            if self.gov is not None:
                self.gov.set_budget(watts)
            self.applied.append((t, watts))  # the first step boundary: when anyone could act
            self.next_step += 1
        whole = int(t)
        if whole > len(self.tokens_at) - 1:
            n = engine.stats().generated_tokens
            while len(self.tokens_at) <= whole:
                self.tokens_at.append((t, n))
        if t >= self.opts.seconds:
            self.final_tokens = engine.stats().generated_tokens
            self.final_s = t
            self._stop()

    def after_governor(self, engine: Engine) -> None:
        """Count the governor's events once it has seen the final step: what it logs later (the
        idle tick after the cancels, which the engine's close may or may not let happen) is not
        part of the run."""
        if self.stopped and self.n_events is None:
            self.n_events = len(self.gov.events)

    def _stop(self) -> None:
        self.stopped = True
        for h in self.handles:
            if not h.done:
                h.cancel()
        self.done.set()


def _settle(log: EnergyLog, timeline: Timeline, end_s: float, band: float = 0.02, hold_s: float = 1.0) -> list[dict]:
    """Per budget step (timed from when it was applied), the rolling 1 s window (ending every
    10 ms) against the new budget and a band of ±``band`` around the phase's steady level (the
    mean of its windows in the second half of the phase):

    * ``reach_s``: until a window is first within the budget and the band;
    * ``settle_s``: until the windows are and stay so for ``hold_s``;
    * ``stays_s``: until they stay so to the end of the phase (None: never; the steady state
      itself may wander outside a ±2 % band: prompt chunks are long steps at coarse levels)."""
    out = []
    steps = list(timeline.steps[1:])
    for i, (at, watts) in enumerate(steps):
        stop = steps[i + 1][0] if i + 1 < len(steps) else end_s
        ends = np.arange(at + 0.01, stop + 1e-9, 0.01)
        if len(ends) < 200:
            continue
        w = np.array([log.average_w(t - 1.0, t) for t in ends])
        steady = float(np.mean(w[ends >= at + (stop - at) / 2]))
        good = (w <= watts * (1 + 1e-9)) & (np.abs(w - steady) <= band * steady)
        hold = int(round(hold_s / 0.01))
        first = np.nonzero(good)[0]
        reach = float(ends[first[0]] - at) if len(first) else None
        settle = next((float(ends[j] - at) for j in range(len(good) - hold) if good[j : j + hold].all()), None)
        bad = np.nonzero(~good)[0]
        stays = 0.0 if not len(bad) else (float(ends[bad[-1]] - at) + 0.01 if bad[-1] + 1 < len(ends) else None)
        out.append(
            {
                "at_s": round(at, 4),
                "budget_w": watts,
                "steady_w": round(steady, 4),
                "reach_s": _round(reach),
                "settle_s": _round(settle),
                "stays_s": _round(stays),
            }
        )
    return out


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _class_stats(summaries: list[tuple[str, Summary]], device_s: float) -> dict:
    """Per priority class: requests, time to first token (device s; a request still waiting at
    the end counts its wait so far: a lower bound, so starvation shows), generated tokens/s over
    the run, and joules per token from the requests' own energy (``engine.energy``)."""
    out = {}
    for cls in sorted({c for c, _ in summaries}):
        mine = [x for c, x in summaries if c == cls]
        ttft = np.array([x.ttft_s if x.generated_tokens else x.total_s for x in mine], float)
        tokens = sum(x.generated_tokens for x in mine)
        joules = sum(x.energy.joules for x in mine)
        out[cls] = {
            "requests": len(mine),
            "finished": sum(x.done_reason in ("stop", "length") for x in mine),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4) if len(ttft) else None,
            "ttft_p95_s": round(float(np.percentile(ttft, 95)), 4) if len(ttft) else None,
            "tokens": tokens,
            "tokens_per_s": round(tokens / device_s, 3) if device_s > 0 else 0.0,
            "joules_per_token": round(joules / tokens, 6) if tokens else None,
            "ttft_s": [round(float(x), 4) for x in ttft],
        }
    return out


def _result(model, opts: SimOptions, run: _Run, log: EnergyLog, gov, states, wall: float) -> SimResult:
    budget = Budget(opts.budget_w)
    end = min(run.final_s, log.end_s)
    span = min(opts.seconds, end)  # the last step may run past the asked seconds
    windows = log.windows(1.0, t_end_s=span)
    short = log.windows(0.1, t_end_s=span)
    timeline = Timeline(((0.0, opts.budget_w),) + tuple(run.applied))
    # 1 s windows are judged after the warm-up, except for SETTLE_S after each budget step
    # (``settle`` reports those)
    skip = tuple((at, at + SETTLE_S) for at, _ in run.applied)
    rep = check(log, timeline, WARMUP_S, end, budget=budget, skip=skip)
    energy = log.energy_at(end)
    tokens = run.final_tokens
    series = [(b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0 for a, b in zip(run.tokens_at, run.tokens_at[1:])]
    events = list(gov.events)[: run.n_events] if gov is not None else []
    return SimResult(
        log=log,
        token_log=(run.step_t, run.step_tokens),
        options={**asdict(opts), "budget_steps": [list(s) for s in opts.budget_steps]},
        model=getattr(model, "name", "") or str(getattr(model, "path", "")),
        device_s=round(end, 4),
        wall_s=round(wall, 3),
        tokens=tokens,
        tokens_per_s=tokens / end if end > 0 else 0.0,
        energy_j=energy,
        joules_per_token=energy / tokens if tokens else float("inf"),
        mean_power_w=energy / end if end > 0 else 0.0,
        windows_w=[round(w, 4) for w in windows],
        short_windows_w=[round(w, 4) for w in short],
        tokens_per_s_series=[round(x, 2) for x in series],
        freq_levels_mhz=list(model.box.profile.freqs_mhz),
        freq_time_s={str(f): round(s, 3) for f, s in sorted(run.level_time.items())},
        batch_time_s={str(b): round(s, 3) for b, s in sorted(run.batch_time.items())},
        events=events,
        report={**asdict(rep), "ok": rep.ok()},
        settle=_settle(log, timeline, end),
        protections={"over_current_events": [s.oc_events for s in states], "thermal_events": [s.thermal_events for s in states]},
        max_temp_c=round(max(s.temp_c for s in states), 2),
        classes=_class_stats(run.summaries, end),
    )


# --- the command line -----------------------------------------------------------------------------


def run_cli(
    model: Path | None,
    *,
    budget_w: float,
    streams: int,
    seconds: float,
    governor: str,
    freq_mhz: int | None,
    batch: int | None,
    budget_steps: str | None,
    max_batch: int,
    chips: int,
    seed: int,
    prompt_chunk: int | None = None,
    mix: str | None = None,
    think_s: float = 3.0,
    scheduler: str = "priority",
) -> SimResult:
    """``edgebox power simulate``: options as the CLI takes them (errors as EdgeboxError).
    ``prompt_chunk``: prompt rows per step (the governor's cap, or the engine's with it off)."""
    from edgebox.errors import EdgeboxError
    from edgebox.power.shapes import shape_model, shape_model_of_file

    if governor not in ("on", "off"):
        raise EdgeboxError(f"--governor takes on or off, got {governor!r}")
    try:
        users = parse_mix(mix)
        if users is not None:
            streams = users[1]
        opts = SimOptions(
            interactive=users[0] if users else 0,
            batch_priority=users is not None,
            think_s=think_s,
            scheduler=scheduler,
            streams=streams,
            seconds=seconds,
            budget_w=budget_w,
            budget_steps=parse_budget_steps(budget_steps),
            governor=governor == "on",
            freq_mhz=freq_mhz,
            batch=batch,
            max_batch=max_batch,
            seed=seed,
            prompt_chunk=prompt_chunk,
        )
    except ValueError as e:
        raise EdgeboxError(str(e)) from None
    if model is None:
        make = lambda: shape_model(chips=chips)  # noqa: E731
    else:
        shape_model_of_file(model, chips=chips).close()  # fail early, with the file's own error
        make = lambda: shape_model_of_file(model, chips=chips)  # noqa: E731
    return simulate(make, opts)


def format_result(r: SimResult) -> str:
    o = r.options
    mode = (
        f"governor on, budget {o['budget_w']:g} W"
        if o["governor"]
        else f"governor off, static clock cap {o['freq_mhz'] or max(r.freq_levels_mhz)} MHz, batch {o['batch'] or o['max_batch']}"
    )
    if o.get("prompt_chunk"):
        mode += f", prompt chunk {o['prompt_chunk']} rows"
    rep = r.report
    lines = [
        f"{r.model}: {o['streams']} streams, {r.device_s:.1f} s of device time ({r.wall_s:.1f} s wall), {mode}",
        f"tokens/s        {r.tokens_per_s:.1f}   ({r.tokens} tokens)",
        f"energy          {r.energy_j:.1f} J, {r.joules_per_token:.4f} J/token, mean {r.mean_power_w:.2f} W",
        f"1 s windows     worst {rep['worst_long_ratio'] * 100:.1f} % of budget, {rep['long_within_fraction'] * 100:.1f} % within "
        f"(rolling, after {WARMUP_S:g} s)",
        f"100 ms windows  worst {rep['worst_short_ratio'] * 100:.1f} % of budget (limit 120 %)",
        "clock time      " + ", ".join(f"{f} MHz {s:.1f} s" for f, s in r.freq_time_s.items()),
        "batch limit     " + ", ".join(f"{b}: {s:.1f} s" for b, s in r.batch_time_s.items()),
        f"protections     over-current events {sum(r.protections['over_current_events'])}, "
        f"thermal trips {sum(r.protections['thermal_events'])}, hottest die {r.max_temp_c:.1f} C",
        f"budget test     {'met' if rep['ok'] else 'NOT met'}",
    ]
    for cls, c in r.classes.items():
        lines.append(
            f"{cls:<15} {c['requests']} requests, TTFT p50 {_or_dash(c['ttft_p50_s'])} s p95 {_or_dash(c['ttft_p95_s'])} s, "
            f"{c['tokens_per_s']:.1f} tokens/s, {_or_dash(c['joules_per_token'], 4)} J/token"
        )
    for s in r.settle:
        lines.append(
            f"budget step     at {s['at_s']:.2f} s to {s['budget_w']:g} W: steady {s['steady_w']:.2f} W, "
            f"within budget and ±2 % after {_or_dash(s['reach_s'])} s, held 1 s after {_or_dash(s['settle_s'])} s"
        )
    lines.append("1 s windows W   " + " ".join(f"{w:.2f}" for w in r.windows_w))
    if r.events:
        lines.append(
            f"events          {len(r.events)}: "
            + "; ".join(f"{e['t_s']:.2f} s {e['kind']}" for e in r.events[:12])
            + (" ..." if len(r.events) > 12 else "")
        )
    return "\n".join(lines)


def _or_dash(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"

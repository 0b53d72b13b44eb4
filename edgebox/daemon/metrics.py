"""Prometheus metrics for ``GET /metrics``: the requests (both transports) and the box itself.

Names are in the ``edgebox_`` namespace and follow vLLM's conventions (``num_requests_running``,
``time_to_first_token_seconds``, ``prompt_tokens_total``, ...), so dashboards built for vLLM map
over by renaming the prefix. Request metrics are counted as requests finish, from both MQTT and
HTTP (label ``transport``); the box's gauges (engine, chips, budget, energy) are read at scrape
time, so a scrape never sees a value older than itself.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; vLLM's buckets cut to what a CPU box sees (first tokens up to a minute, tokens up to 2 s)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    """The registry behind ``/metrics``. ``engine``, ``power`` and ``chips`` are read at scrape
    time (callables returning the dicts of ``ModelHost.stats``, ``BoxPower.status`` and
    ``power.status.chip_status``; None or [] when there is nothing to report)."""

    def __init__(self, engine: Callable[[], dict | None], power: Callable[[], dict], chips: Callable[[], list[dict]]):
        disable_created_metrics()  # no *_created series: they double the scrape for no dashboard's use
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edgebox_requests",
            "Requests answered, by transport, endpoint and outcome",
            ["transport", "endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("edgebox_prompt_tokens", "Prompt tokens processed", ["transport"], registry=r)
        self.generation_tokens = Counter("edgebox_generation_tokens", "Tokens generated", ["transport"], registry=r)
        self.cache_queries = Counter(
            "edgebox_prefix_cache_queries", "Prompt tokens looked up in the prompt cache", ["transport"], registry=r
        )
        self.cache_hits = Counter(
            "edgebox_prefix_cache_hits", "Prompt tokens found in the prompt cache", ["transport"], registry=r
        )
        self.ttft = Histogram(
            "edgebox_time_to_first_token_seconds", "Submit to first token", ["transport"], buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "edgebox_time_per_output_token_seconds",
            "Decode time per token after the first",
            ["transport"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "edgebox_e2e_request_latency_seconds", "Submit to last token", ["transport"], buckets=E2E_BUCKETS, registry=r
        )
        r.register(_BoxCollector(engine, power, chips))

    def finished(self, transport: str, endpoint: str, summary) -> None:
        """A request the engine ran has ended (an engine ``Summary``)."""
        s = summary
        outcome = s.done_reason if s.done_reason in ("stop", "length", "tool_calls", "cancelled") else "error"
        self.requests.labels(transport, endpoint, outcome).inc()
        self.prompt_tokens.labels(transport).inc(s.prompt_tokens)
        self.generation_tokens.labels(transport).inc(s.generated_tokens)
        self.cache_queries.labels(transport).inc(s.prompt_tokens)
        self.cache_hits.labels(transport).inc(s.cached_prompt_tokens)
        if s.generated_tokens:
            self.ttft.labels(transport).observe(s.ttft_s)
            self.e2e.labels(transport).observe(s.total_s)
        if s.generated_tokens > 1:
            self.tpot.labels(transport).observe(s.decode_s / (s.generated_tokens - 1))

    def refused(self, transport: str, endpoint: str, status: int) -> None:
        """A request turned away before the engine ran it (400, 401, 413, 429, 503, ...)."""
        self.requests.labels(transport, endpoint, f"refused_{status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BoxCollector:
    """The engine's and the chips' state, read when Prometheus scrapes."""

    def __init__(self, engine, power, chips):
        self.engine, self.power, self.chips = engine, power, chips

    def describe(self):
        return []  # read at scrape time only: nothing to describe up front

    def collect(self):
        e = self.engine() or {}
        yield _gauge("edgebox_num_requests_running", "Sequences in the running batch", e.get("running", 0))
        yield _gauge("edgebox_num_requests_waiting", "Requests queued for a place in the batch", e.get("queued", 0))
        yield _gauge("edgebox_batch_limit", "Sequences the governor lets run at once", e.get("batch_limit", 0))
        used, budget = e.get("kv_used_bytes", 0), e.get("kv_budget_bytes", 0)
        yield _gauge("edgebox_kv_cache_usage_perc", "KV cache in use, 0 to 1 of the budget", used / budget if budget else 0.0)
        yield _gauge("edgebox_kv_cache_used_bytes", "KV cache bytes reserved by running sequences", used)
        yield _gauge("edgebox_model_loaded", "1 when a model is loaded and warm", 1 if e else 0)
        energy = e.get("energy") or {}
        busy = CounterMetricFamily("edgebox_energy_joules", "Chip energy since the model loaded, by who pays", labels=["part"])
        busy.add_metric(["requests"], energy.get("total_j", 0.0) - energy.get("idle_j", 0.0))
        busy.add_metric(["idle"], energy.get("idle_j", 0.0))
        yield busy

        p = self.power()
        yield _gauge("edgebox_power_budget_watts", "The box's power budget", p.get("budget_w") or 0.0)
        yield _gauge("edgebox_power_budget_enforced", "1 when the governor holds the budget", 1 if p.get("enforced") else 0)

        chips = self.chips()
        power = GaugeMetricFamily("edgebox_chip_power_watts", "Chip power (firmware sensor)", labels=["chip"])
        clock = GaugeMetricFamily("edgebox_chip_clock_mhz", "Chip clock", labels=["chip"])
        temp = GaugeMetricFamily("edgebox_chip_temperature_celsius", "Chip temperature", labels=["chip"])
        throttled = GaugeMetricFamily(
            "edgebox_chip_throttled", "1 while the chip is held below its top clock for this reason", labels=["chip", "reason"]
        )
        energy = CounterMetricFamily("edgebox_chip_energy_joules", "Chip energy counter (firmware)", labels=["chip"])
        for c in chips:
            chip = str(c.get("chip"))
            if c.get("power_w") is not None:
                power.add_metric([chip], c["power_w"])
            if c.get("freq_mhz") is not None:
                clock.add_metric([chip], c["freq_mhz"])
            if c.get("temp_c") is not None:
                temp.add_metric([chip], c["temp_c"])
            for reason in c.get("throttle_reasons", []):
                throttled.add_metric([chip, reason], 1)
            if c.get("energy_counter_j") is not None:
                energy.add_metric([chip], c["energy_counter_j"])
        yield from (power, clock, temp, throttled, energy)
        total = [c["power_w"] for c in chips if c.get("power_w") is not None]
        yield _gauge("edgebox_power_watts", "The chips' power together", sum(total))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))

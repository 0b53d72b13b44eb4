"""The ``edgebox`` command line (typer).

Errors a user can act on (``EdgeboxError``) print as one line on stderr with exit code 2; usage
errors keep click's exit code 2 as well; nothing prints a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from edgebox.errors import EdgeboxError

try:  # newer typer vendors click as typer._click: its usage errors are not click's classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # older typer raises click's own
    _TyperClickException = click.ClickException
_TyperAbort = getattr(typer, "Abort", click.exceptions.Abort)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="edgebox: run DeepSeek-class GGUF models on power-capped edge boxes.",
)

ModelArg = typer.Argument(None, help="GGUF model file (default: the bundled tiny model)", show_default=False)


def _load(
    model: Path | None,
    chips: int = 1,
    n_ctx: int | None = None,
    profile: str | None = None,
    backend: str = "numba",
    cache_types: tuple[str, str] = ("f16", "f16"),
):
    _read_ahead(model, chips)
    import edgebox

    return edgebox.load(
        model,
        chips=chips,
        n_ctx=n_ctx,
        profile=profile,
        backend=backend,
        cache_type_k=cache_types[0],
        cache_type_v=cache_types[1],
    )


def _read_ahead(model: Path | None, chips: int, weight_cache: bool = True) -> None:
    """Start reading the model's weights from disk (``kernels.entry_hint``): a command's first
    step, before numpy and numba are imported (a second call is a no-op)."""
    from edgebox.kernels import entry_hint

    if model is not None:
        entry_hint.read_ahead_model(model, chips, weight_cache=weight_cache)


def _cache_type_opt(which: str):
    return typer.Option(
        "f16", f"--cache-type-{which}", help=f"KV cache type of {which.upper()}: f16, q8_0 or q4_0 (llama.cpp's names)"
    )


def _weight_cache(no_weight_cache: bool, weight_cache_gib: float | None) -> None:
    """Apply --no-weight-cache / --weight-cache-gib (they set what EDGEBOX_WEIGHT_CACHE and
    EDGEBOX_WEIGHT_CACHE_GIB set, for this process and the ones it starts)."""
    from edgebox.kernels import packcache

    try:
        packcache.configure(False if no_weight_cache else None, weight_cache_gib, gib_name="--weight-cache-gib")
    except ValueError as e:
        raise EdgeboxError(str(e)) from None


NoWeightCacheOpt = typer.Option(
    False, "--no-weight-cache", help="neither read nor write the packed-weight cache (as EDGEBOX_WEIGHT_CACHE=0)"
)
WeightCacheGibOpt = typer.Option(
    None,
    "--weight-cache-gib",
    help="keep the packed-weight cache under N GiB, evicting the least recently used (as EDGEBOX_WEIGHT_CACHE_GIB; default 16)",
    show_default=False,
)


def _backend_opt(default: str = "auto"):
    return typer.Option(
        default,
        "--backend",
        help="matmul kernels: numba, onnxruntime, auto (the faster per shape, timed once on this CPU and cached) or ref",
    )


@app.command()
def run(
    model: Path | None = ModelArg,
    prompt: str = typer.Option("", "-p", "--prompt", help="the prompt (or the user message with --chat)"),
    n_predict: int = typer.Option(128, "-n", "--n-predict", min=1, help="tokens to generate at most"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling threshold (1 = off)"),
    min_p: float = typer.Option(0.05, "--min-p", help="drop tokens below min_p x the top probability (0 = off)"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalty for recently seen tokens (1 = off)"),
    seed: int | None = typer.Option(None, "--seed", help="RNG seed: the same seed gives the same text"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt with the GGUF's chat template (llama.cpp --jinja)"),
    system: str | None = typer.Option(None, "--system", help="system message in --chat mode"),
    chips: int = typer.Option(4, "--chips", min=1, help="chips to split the model over (the box has four)"),
    ctx: int | None = typer.Option(None, "--ctx", min=1, help="context size (default: min(4096, the model's))"),
    backend: str = _backend_opt(),
    cache_type_k: str = _cache_type_opt("k"),
    cache_type_v: str = _cache_type_opt("v"),
    no_weight_cache: bool = NoWeightCacheOpt,
    weight_cache_gib: float | None = WeightCacheGibOpt,
    spec: str = typer.Option("none", "--spec", help="speculative decoding: none, ngram (prompt lookup) or draft (--model-draft)"),
    draft_max: int = typer.Option(8, "--draft-max", help="most tokens drafted per step"),
    model_draft: Path | None = typer.Option(
        None, "--model-draft", help="the draft model of --spec draft: a GGUF with the model's tokenizer", show_default=False
    ),
) -> None:
    """Generate text from a prompt, streamed to stdout; a timing line goes to stderr."""
    _read_ahead(model, chips, weight_cache=not no_weight_cache)
    from edgebox.engine.speculative import Speculative
    from edgebox.text.sampler import SamplingParams

    speculative = Speculative(spec, draft_max, model_draft=model_draft and str(model_draft))
    if speculative.kind == "draft" and model_draft is None:
        raise EdgeboxError("--spec draft needs --model-draft FILE: a smaller GGUF with the model's tokenizer")

    _weight_cache(no_weight_cache, weight_cache_gib)
    m = _load(model, chips, ctx, backend=backend, cache_types=(cache_type_k, cache_type_v))
    text = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = m.render_chat(messages)
    try:
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    except ValueError as e:
        raise EdgeboxError(str(e)) from None
    ids = m.tokenize_prompt(text)
    m.prepare(progress=True)
    if speculative.on:
        _run_speculative(m, ids, n_predict, params, stop, speculative, chips, ctx, backend)
        return
    gen = m.stream(ids, max_tokens=n_predict, params=params, stop=stop)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = gen.stats
    print(
        f"prompt: {s.prompt_tokens} tokens, {s.prompt_tok_per_s:.1f} tok/s | "
        f"decode: {s.generated_tokens} tokens, {s.decode_tok_per_s:.1f} tok/s | stop: {s.done_reason}",
        file=sys.stderr,
    )


def _run_speculative(m, ids, n_predict, params, stop, speculative, chips, ctx, backend) -> None:
    """``run`` with drafts: one request through the engine, which verifies them."""
    from edgebox.engine import Engine, Request

    draft = _load(Path(speculative.model_draft), 1, ctx, backend=backend) if speculative.kind == "draft" else None
    with Engine(m, max_batch=1, speculative=speculative, draft_model=draft, warmup=False) as engine:
        h = engine.submit(Request(prompt_ids=tuple(ids), max_tokens=n_predict, params=params, stop=tuple(stop)))
        for chunk in h:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        s = h.result()
    sys.stdout.write("\n")
    if not s.ok:
        raise EdgeboxError(f"generation failed: {s.error}")
    prompt_rate = (s.prompt_tokens - s.cached_prompt_tokens) / s.prompt_s if s.prompt_s > 0 else 0.0
    print(
        f"prompt: {s.prompt_tokens} tokens, {prompt_rate:.1f} tok/s | "
        f"decode: {s.generated_tokens} tokens, {s.decode_tok_per_s:.1f} tok/s | "
        f"draft: {s.draft_accepted}/{s.draft_tokens} accepted | stop: {s.done_reason}",
        file=sys.stderr,
    )


@app.command()
def info(model: Path | None = ModelArg) -> None:
    """Architecture, size, tensor types, context, tokenizer and chat template of a model."""
    from edgebox.commands.info import describe

    for key, value in describe(_load(model)):
        typer.echo(f"{key:<16} {value}")


# -- the daemon ---------------------------------------------------------------------------------------
# Every setting of edgebox.daemon.config.DaemonConfig is a flag here (a test checks it), except the
# broker password: argv is readable by every user, so it comes from the config file or the
# environment. Flags left unset fall back to the config file, then to the defaults.


def _opt(*names: str, help: str):
    return typer.Option(None, *names, help=help, show_default=False)


@app.command()
def serve(
    config: Path | None = _opt("--config", "-c", help="TOML config file (flags override it)"),
    model: Path | None = _opt("--model", help="GGUF model to serve (default: the bundled tiny model)"),
    chips: int | None = _opt("--chips", help="chips to split the model over (default 4)"),
    ctx: int | None = _opt("--ctx", help="context size (default: min(4096, the model's))"),
    backend: str | None = _opt("--backend", help="matmul kernels: numba, onnxruntime, auto or ref (default auto)"),
    cache_type_k: str | None = _opt("--cache-type-k", help="KV cache type of K: f16, q8_0 or q4_0 (default f16)"),
    cache_type_v: str | None = _opt("--cache-type-v", help="KV cache type of V: f16, q8_0 or q4_0 (default f16)"),
    max_batch: int | None = _opt("--max-batch", help="sequences decoded together at most (default 8)"),
    spec: str | None = _opt(
        "--spec", help="speculative decoding: none, ngram (prompt lookup) or draft (--model-draft) (default none)"
    ),
    draft_max: int | None = _opt("--draft-max", help="most tokens drafted per sequence and step (default 8)"),
    model_draft: Path | None = _opt("--model-draft", help="the draft model of --spec draft: a GGUF with the model's tokenizer"),
    kv_budget_mib: float | None = _opt("--kv-budget-mib", help="KV cache budget in MiB"),
    models_dir: Path | None = _opt("--models-dir", help="load_model accepts files under this directory only"),
    device_id: str | None = _opt("--device-id", help="this box's name in topics (default: the hostname)"),
    broker: str | None = _opt(
        "--broker", help="mqtt://HOST:PORT, mqtts://HOST:PORT or none for HTTP only (default mqtt://127.0.0.1:1883)"
    ),
    username: str | None = _opt("--username", help="broker user (password: config file or EDGEBOX_MQTT_PASSWORD)"),
    password_file: Path | None = _opt("--password-file", help="file holding the broker password"),
    ca_file: Path | None = _opt("--ca-file", help="CA bundle for mqtts://"),
    cert_file: Path | None = _opt("--cert-file", help="client certificate for mqtts://"),
    key_file: Path | None = _opt("--key-file", help="client key for mqtts://"),
    client_id: str | None = _opt("--client-id", help="MQTT client id (default edgebox-DEVICE_ID)"),
    keepalive_s: int | None = _opt("--keepalive-s", help="MQTT keepalive seconds (default 30)"),
    session_expiry_s: int | None = _opt(
        "--session-expiry-s", help="broker keeps queued commands this long while we are away (default 7 days)"
    ),
    reconnect_min_s: float | None = _opt("--reconnect-min-s", help="first reconnect delay (default 0.5)"),
    reconnect_max_s: float | None = _opt("--reconnect-max-s", help="longest reconnect delay (default 30)"),
    max_queued_messages: int | None = _opt(
        "--max-queued-messages", help="outgoing messages held while the broker is away (default 4096)"
    ),
    budget: float | None = _opt("--budget", help="power budget in watts (default 10)"),
    max_in_flight: int | None = _opt(
        "--max-in-flight", help="generate requests running or queued; more get 429 (default max_batch + 512)"
    ),
    max_payload_bytes: int | None = _opt("--max-payload-bytes", help="larger command payloads get 413 (default 262144)"),
    max_tokens_limit: int | None = _opt("--max-tokens-limit", help="largest max_tokens a request may ask (default 4096)"),
    telemetry_interval_s: float | None = _opt("--telemetry-interval-s", help="seconds between telemetry messages (default 5)"),
    drain_timeout_s: float | None = _opt(
        "--drain-timeout-s", help="on SIGTERM, time for running requests to finish (default 30)"
    ),
    governor: bool | None = _opt("--governor/--no-governor", help="hold the budget with the power governor (default on)"),
    fw_root: Path | None = _opt(
        "--fw-root", help="where the chips' firmware publishes its hwmon tree (default $RUNTIME_DIRECTORY/fw)"
    ),
    log_level: str | None = _opt("--log-level", help="debug, info, warning or error (default info)"),
    config_version: str | None = _opt("--config-version", help="a label for this configuration, reported in state"),
    http: str | None = _opt("--http", help="HOST:PORT of the OpenAI-compatible HTTP API, or none (default 127.0.0.1:8080)"),
    api_key_file: Path | None = _opt(
        "--api-key-file", help="file holding the HTTP API key (clients send Authorization: Bearer KEY)"
    ),
    ssl_cert_file: Path | None = _opt("--ssl-cert-file", help="serve HTTPS with this certificate"),
    ssl_key_file: Path | None = _opt("--ssl-key-file", help="the HTTPS private key"),
    http_max_body_bytes: int | None = _opt("--http-max-body-bytes", help="larger HTTP bodies get 413 (default 1 MiB)"),
    metrics_need_key: bool | None = _opt(
        "--metrics-need-key/--metrics-open", help="whether /metrics asks for the API key (default: it does)"
    ),
    cors_origins: list[str] | None = _opt("--cors-origin", help="allow this origin by CORS (repeatable; default none)"),
    weight_cache: bool | None = _opt(
        "--weight-cache/--no-weight-cache", help="read and write the packed-weight cache (default: on, or EDGEBOX_WEIGHT_CACHE)"
    ),
    weight_cache_gib: float | None = _opt(
        "--weight-cache-gib", help="the packed-weight cache's size bound in GiB (default 16, or EDGEBOX_WEIGHT_CACHE_GIB)"
    ),
) -> None:
    """Serve the model until SIGTERM: the OpenAI-compatible HTTP API and MQTT 5 commands, streamed
    replies and telemetry, from one engine under one power budget."""
    flags = {name: value for name, value in locals().items() if name != "config"}  # first: only the options
    from edgebox.daemon.service import run_service

    raise typer.Exit(run_service(config, flags))


client_app = typer.Typer(no_args_is_help=True, help="Drive boxes over MQTT: generate, status, budget, devices.")
app.add_typer(client_app, name="client")


@client_app.callback()
def client_options(
    ctx: typer.Context,
    broker: str = typer.Option(
        "mqtt://127.0.0.1:1883", "--broker", envvar="EDGEBOX_BROKER", help="mqtt://HOST:PORT or mqtts://HOST:PORT"
    ),
    username: str | None = typer.Option(
        None, "--username", envvar="EDGEBOX_MQTT_USERNAME", help="broker user (password: EDGEBOX_MQTT_PASSWORD)"
    ),
    ca_file: Path | None = typer.Option(None, "--ca-file", help="CA bundle for mqtts://"),
    cert_file: Path | None = typer.Option(None, "--cert-file", help="client certificate for mqtts://"),
    key_file: Path | None = typer.Option(None, "--key-file", help="client key for mqtts://"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait for the final reply"),
) -> None:
    import os

    ctx.obj = dict(
        broker=broker,
        username=username,
        password=os.environ.get("EDGEBOX_MQTT_PASSWORD") or None,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        timeout=timeout,
    )


DeviceOpt = typer.Option(..., "--device", "-d", envvar="EDGEBOX_DEVICE", help="device id (or EDGEBOX_DEVICE)")


def _fleet(ctx: typer.Context):
    from edgebox.daemon.client import FleetClient

    o = dict(ctx.obj)
    o.pop("timeout")
    return FleetClient(**o)


@client_app.command("generate")
def client_generate(
    ctx: typer.Context,
    device: str = DeviceOpt,
    prompt: str = typer.Option(..., "-p", "--prompt", help="the prompt (the user message with --chat)"),
    n_predict: int = typer.Option(128, "-n", "--n-predict", min=1, help="tokens to generate at most"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    seed: int | None = typer.Option(None, "--seed", help="RNG seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="send as chat messages (the box applies the model's template)"),
    system: str | None = typer.Option(None, "--system", help="system message with --chat"),
    priority: str = typer.Option(
        "interactive", "--priority", help="interactive, or batch (served after, at the efficient clock)"
    ),
    deadline_s: float | None = typer.Option(
        None, "--deadline-s", help="refused (429, retry_after_s) if it cannot start this soon"
    ),
) -> None:
    """Stream a completion from DEVICE to stdout; usage and timings go to stderr."""
    params: dict = {"max_tokens": n_predict, "temperature": temp, "stop": stop, "priority": priority}
    if seed is not None:
        params["seed"] = seed
    if deadline_s is not None:
        params["deadline_s"] = deadline_s
    if chat:
        params["messages"] = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        params["prompt"] = prompt

    def show(chunk: dict) -> None:
        out = sys.stderr if chunk.get("reasoning") else sys.stdout
        out.write(chunk.get("delta", ""))
        out.flush()

    with _fleet(ctx) as fleet:
        final = fleet.call(device, "generate", params, timeout=ctx.obj["timeout"], on_chunk=show)
    sys.stdout.write("\n")
    u, t = final.get("usage", {}), final.get("timings", {})
    print(
        f"{device}: prompt {u.get('prompt_tokens')} tokens | generated {u.get('completion_tokens')} tokens, "
        f"{t.get('decode_tokens_per_s')} tok/s | {t.get('total_ms')} ms | stop: {final.get('done_reason')}",
        file=sys.stderr,
    )


@client_app.command("status")
def client_status(ctx: typer.Context, device: str = DeviceOpt) -> None:
    """DEVICE's state, engine, telemetry and settings (get_status), as JSON."""
    import json

    with _fleet(ctx) as fleet:
        final = fleet.call(device, "get_status", timeout=ctx.obj["timeout"])
    typer.echo(json.dumps(final["result"], indent=2, default=str))


@client_app.command("budget")
def client_budget(
    ctx: typer.Context, watts: float = typer.Argument(..., help="power budget in watts"), device: str = DeviceOpt
) -> None:
    """Set DEVICE's power budget."""
    with _fleet(ctx) as fleet:
        result = fleet.call(device, "set_power_budget", {"watts": watts}, timeout=ctx.obj["timeout"])["result"]
    typer.echo(f"{device}: budget {result['budget_w']} W" + ("" if result.get("enforced") else f" ({result.get('note')})"))


@client_app.command("devices")
def client_devices(
    ctx: typer.Context,
    wait: float = typer.Option(0.5, "--wait", help="seconds to collect retained status"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every box the broker knows of: online or offline, model, budget (from retained topics)."""
    import json
    import time

    with _fleet(ctx) as fleet:
        devices = fleet.devices(wait)
    if as_json:
        typer.echo(json.dumps(devices, indent=2, default=str))
        return
    typer.echo(f"{'DEVICE':<24} {'STATUS':<8} {'STATE':<10} {'MODEL':<28} {'BUDGET':>7}  SINCE")
    for d in devices:
        st = d.get("device_state") or {}
        since = d.get("since")
        age = f"{time.time() - since:.0f} s ago" if isinstance(since, (int, float)) else ""
        model = (st.get("model") or {}).get("name", "-") if st else "-"
        budget = f"{st['budget_w']:g} W" if isinstance(st.get("budget_w"), (int, float)) else "-"
        typer.echo(f"{d['device_id']:<24} {d.get('state', '?'):<8} {st.get('state', '-'):<10} {model:<28} {budget:>7}  {age}")


@client_app.command("cancel")
def client_cancel(
    ctx: typer.Context, target: str = typer.Argument(..., help="request_id of the generate"), device: str = DeviceOpt
) -> None:
    """Cancel a running generate on DEVICE."""
    with _fleet(ctx) as fleet:
        fleet.call(device, "cancel", {"target": target}, timeout=ctx.obj["timeout"])
    typer.echo(f"{device}: cancelled {target}")


@client_app.command("load-model")
def client_load_model(
    ctx: typer.Context,
    path: str = typer.Argument(..., help="GGUF path on the box (under its models_dir)"),
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="cancel requests in flight instead of refusing"),
) -> None:
    """Load another model on DEVICE (the old one serves until the new file is known good)."""
    with _fleet(ctx) as fleet:
        result = fleet.call(device, "load_model", {"path": path, "force": force}, timeout=ctx.obj["timeout"])["result"]
    typer.echo(f"{device}: loaded {result['name']} ({result['load_s']} s + {result['warmup_s']} s warm-up)")


@client_app.command("unload-model")
def client_unload_model(
    ctx: typer.Context,
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="cancel requests in flight instead of refusing"),
) -> None:
    """Unload DEVICE's model (generate then answers 503 until load-model)."""
    with _fleet(ctx) as fleet:
        fleet.call(device, "unload_model", {"force": force}, timeout=ctx.obj["timeout"])
    typer.echo(f"{device}: model unloaded")


@client_app.command("fleet")
def client_fleet(
    ctx: typer.Context,
    wait: float = typer.Option(2.5, "--wait", min=0.1, help="seconds to collect retained status and telemetry"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every box's budget, power, tokens/s and energy per token (from status and telemetry)."""
    import json
    import time

    from edgebox.daemon.fleet import FleetWatch

    with _fleet(ctx) as client:
        watch = FleetWatch(client).start()
        time.sleep(wait)  # retained status comes at once; telemetry once per box's interval
        rows = watch.rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    num = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    typer.echo(f"{'DEVICE':<24} {'STATUS':<8} {'BUDGET W':>9} {'POWER W':>8} {'TOK/S':>9} {'J/TOKEN':>9} {'TOK/S/W':>9}")
    for r in rows:
        typer.echo(
            f"{r['device_id']:<24} {'online' if r['online'] else 'offline':<8} {num(r['budget_w'], '.3f'):>9} "
            f"{num(r['power_w'], '.3f'):>8} {num(r['tokens_per_s'], '.1f'):>9} {num(r['joules_per_token'], '.4f'):>9} "
            f"{num(r['marginal_tps_per_w'], '.1f'):>9}"
        )
    online = [r for r in rows if r["online"]]
    total = sum(r["budget_w"] or 0.0 for r in online)
    typer.echo(f"{len(online)} of {len(rows)} boxes online; budgets sum to {total:.3f} W")


@app.command()
def fleet(
    broker: str = typer.Option(
        "mqtt://127.0.0.1:1883", "--broker", envvar="EDGEBOX_BROKER", help="mqtt://HOST:PORT or mqtts://HOST:PORT"
    ),
    budget: float = typer.Option(..., "--budget", min=0.001, help="the site's power budget in watts, shared by every box"),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="seconds between allocations"),
    username: str | None = typer.Option(
        None, "--username", envvar="EDGEBOX_MQTT_USERNAME", help="broker user (password: EDGEBOX_MQTT_PASSWORD)"
    ),
    ca_file: Path | None = typer.Option(None, "--ca-file", help="CA bundle for mqtts://"),
    cert_file: Path | None = typer.Option(None, "--cert-file", help="client certificate for mqtts://"),
    key_file: Path | None = typer.Option(None, "--key-file", help="client key for mqtts://"),
) -> None:
    """The fleet controller: hold every box of the broker within one site budget (until Ctrl-C/SIGTERM)."""
    import logging
    import os
    import signal
    import threading

    from edgebox.daemon.fleet import FleetController

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("edgebox.fleet")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    stop = threading.Event()
    controller = FleetController(
        broker,
        budget,
        interval_s=interval,
        username=username,
        password=os.environ.get("EDGEBOX_MQTT_PASSWORD") or None,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )

    def halt(signum, frame):
        stop.set()
        controller.wake()

    signal.signal(signal.SIGTERM, halt)
    signal.signal(signal.SIGINT, halt)
    with controller:
        logger.info("fleet controller on %s: site budget %g W, every %g s", broker, budget, interval)
        controller.run(stop)


@app.command()
def plan(
    model: Path | None = ModelArg,
    chips: int = typer.Option(4, "--chips", min=1, help="chips in the box"),
    profile: str | None = typer.Option(
        None, "--profile", help="chip profile name or TOML path (default r100-edge; host for 1 chip)"
    ),
    budget: float = typer.Option(10.0, "--budget", help="power budget in watts"),
    context: int = typer.Option(512, "--context", min=1, help="tokens of context per sequence"),
    cache_type_k: str = _cache_type_opt("k"),
    cache_type_v: str = _cache_type_opt("v"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Capacity planning: per-chip memory, predicted tok/s and watts at every DVFS level and batch."""
    import json

    from edgebox.commands.plan import format_plan, make_plan

    m = _load(model, chips, profile=profile, cache_types=(cache_type_k, cache_type_v))
    p = make_plan(m, budget, context=context)
    typer.echo(json.dumps(p.to_dict(), indent=1) if json_out else format_plan(p))


@app.command()
def perplexity(
    model: Path = typer.Argument(..., help="GGUF model file"),
    text_file: Path = typer.Argument(..., help="text to score (UTF-8)"),
    ctx: int = typer.Option(512, "--ctx", min=4, help="tokens per chunk; the second half of each is scored"),
    chips: int = typer.Option(1, "--chips", min=1, help="chips to split the model over"),
    vs_llama_cpp: bool = typer.Option(False, "--vs-llama-cpp", help="also compute llama.cpp's figure on the same chunks"),
    backend: str = _backend_opt(),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Perplexity with llama.cpp's method (non-overlapping chunks, second half scored)."""
    import json
    from dataclasses import asdict

    from edgebox.commands.perplexity import llama_cpp_logits_of
    from edgebox.commands.perplexity import perplexity as compute

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeboxError(f"cannot read {text_file}: {e}") from None
    m = _load(model, chips, n_ctx=ctx, backend=backend)
    tokens = m.tokenize(text)
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    ours = compute(m.logits, tokens, ctx, bos)
    out = {"edgebox": asdict(ours)}
    if vs_llama_cpp:
        theirs = compute(llama_cpp_logits_of(str(model), ctx), tokens, ctx, bos)
        out["llama_cpp"] = asdict(theirs)
        out["ratio"] = ours.ppl / theirs.ppl
    if json_out:
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(
        f"edgebox:   PPL = {ours.ppl:.4f} +/- {ours.ppl_err:.5f}  ({ours.n_chunks} chunks of {ctx}, {ours.scored_tokens} tokens scored, {ours.seconds:.1f} s)"
    )
    if vs_llama_cpp:
        theirs = out["llama_cpp"]
        typer.echo(f"llama.cpp: PPL = {theirs['ppl']:.4f} +/- {theirs['ppl_err']:.5f}  ({theirs['seconds']:.1f} s)")
        typer.echo(f"ratio edgebox / llama.cpp = {out['ratio']:.4f}")


@app.command()
def bench(
    model: Path | None = ModelArg,
    threads: int = typer.Option(2, "--threads", "-t", min=1, help="threads for edgebox and llama.cpp alike"),
    prompt: str = typer.Option("64,512", "--prompt", help="prompt lengths to time, comma separated"),
    n_decode: int = typer.Option(32, "--n-decode", min=2, help="decode steps to time"),
    chips: int = typer.Option(
        1, "--chips", min=1, help="chips to split the model over (1: the host's own speed, as llama.cpp runs)"
    ),
    backend: str = _backend_opt(),
    cache_type_k: str = _cache_type_opt("k"),
    cache_type_v: str = _cache_type_opt("v"),
    concurrency: str = typer.Option("", "--concurrency", help="engine levels, e.g. 1,4,8,16 (adds the hot-standby TTFT)"),
    vs_llama_cpp: bool = typer.Option(False, "--vs-llama-cpp", help="run llama.cpp on the same file and threads, print ratios"),
    rounds: int = typer.Option(
        1,
        "--rounds",
        min=1,
        help="measure everything this many times, the runners taking turns; ratios are the median of the rounds",
    ),
    startup: bool = typer.Option(
        False,
        "--startup",
        help="instead: process start -> first token on 1 and 4 chips, weight cache cold and warm, page cache dropped and not",
    ),
    no_weight_cache: bool = NoWeightCacheOpt,
    weight_cache_gib: float | None = WeightCacheGibOpt,
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Prompt processing, decode, TTFT and memory (and engine concurrency), optionally beside llama.cpp."""
    import json

    from edgebox.commands.bench import format_report, format_startup, run_bench, run_startup_bench

    _weight_cache(no_weight_cache, weight_cache_gib)

    try:
        lens = tuple(int(x) for x in prompt.split(",") if x)
        levels = tuple(int(x) for x in concurrency.split(",") if x)
    except ValueError:
        raise EdgeboxError(
            f"--prompt and --concurrency take comma-separated integers, got {prompt!r} / {concurrency!r}"
        ) from None
    if not lens or min(lens) < 1 or (levels and min(levels) < 1):
        raise EdgeboxError("--prompt and --concurrency need positive integers")
    path = model or _default_model()
    if not Path(path).is_file():
        raise EdgeboxError(f"{path}: no such model file")
    from edgebox.kernels.kv_quant import cache_type

    cache_types = (cache_type(cache_type_k, "--cache-type-k"), cache_type(cache_type_v, "--cache-type-v"))
    if startup:
        report = run_startup_bench(path, threads, vs_llama_cpp, rounds, backend)
        typer.echo(json.dumps(report, indent=1) if json_out else format_startup(report))
        return
    report = run_bench(path, threads, lens, n_decode, vs_llama_cpp, chips, levels, backend, rounds, cache_types)
    typer.echo(json.dumps(report, indent=1) if json_out else format_report(report))


def _default_model() -> Path:
    import edgebox

    return edgebox.default_model_path()


# -- power: chip status and the governor's simulator (edgebox.power) -------------------------------

power_app = typer.Typer(no_args_is_help=True, help="Chip power: status like nvidia-smi, and the governor's simulator.")
app.add_typer(power_app, name="power")


@power_app.command("status")
def power_status(
    fw_root: Path = typer.Option(Path("/run/edgebox/fw"), "--fw-root", help="the chips' firmware tree (hwmon + cpufreq)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per chip: power, clocks, voltage, temperature and the throttle reasons (budget, thermal, over-current)."""
    import json

    from edgebox.power.status import chip_status, format_status

    chips = chip_status(fw_root)
    typer.echo(json.dumps({"fw_root": str(fw_root), "chips": chips}, indent=1) if json_out else format_status(chips, fw_root))


@power_app.command("simulate")
def power_simulate(
    model: Path | None = typer.Argument(
        None, help="GGUF file whose shape to run (default: DeepSeek-LLM-7B Q4_0, no file needed)", show_default=False
    ),
    budget: float = typer.Option(10.0, "--budget", help="power budget in watts (1 s average; 1.2x over 100 ms)"),
    streams: int = typer.Option(4, "--streams", min=1, help="concurrent generation streams, each request after request"),
    seconds: float = typer.Option(60.0, "--seconds", help="device seconds to simulate"),
    governor: str = typer.Option("on", "--governor", help="on, or off for static settings"),
    freq: int | None = typer.Option(None, "--freq", help="static clock cap in MHz (with --governor off)"),
    batch: int | None = typer.Option(None, "--batch", help="static batch limit (with --governor off)"),
    budget_steps: str | None = typer.Option(None, "--budget-steps", help="budget changes as SECONDS:WATTS,... e.g. 20:7,40:10"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="the engine's batch limit at most"),
    chips: int = typer.Option(4, "--chips", min=2, help="chips to split the model over"),
    seed: int = typer.Option(0, "--seed", help="seed of the prompt and generation lengths"),
    prompt_chunk: int | None = typer.Option(
        None, "--prompt-chunk", min=1, help="prompt rows per step (governor on: default 32; off: the engine's 128)"
    ),
    mix: str | None = typer.Option(
        None,
        "--mix",
        help="INTERACTIVE:BATCH: interactive users (think, ask, wait) beside batch-priority streams (replaces --streams)",
    ),
    think: float = typer.Option(3.0, "--think", help="an interactive user's mean pause between requests (device s)"),
    scheduler: str = typer.Option("priority", "--scheduler", help="priority, or fifo: every request interactive (the baseline)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON (windows_w, short_windows_w, tokens_per_s, ...)"),
) -> None:
    """A dry run (no math) of STREAMS generation streams for SECONDS of device time: power windows, tokens/s, events."""
    import json

    from edgebox.power.simulate import format_result, run_cli

    r = run_cli(
        model,
        budget_w=budget,
        streams=streams,
        seconds=seconds,
        governor=governor,
        freq_mhz=freq,
        batch=batch,
        budget_steps=budget_steps,
        max_batch=max_batch,
        chips=chips,
        seed=seed,
        prompt_chunk=prompt_chunk,
        mix=mix,
        think_s=think,
        scheduler=scheduler,
    )
    typer.echo(json.dumps(r.to_dict(), indent=1) if json_out else format_result(r))


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except (click.ClickException, _TyperClickException) as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, _TyperAbort):
        sys.exit(130)
    except EdgeboxError as e:
        print(f"edgebox: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

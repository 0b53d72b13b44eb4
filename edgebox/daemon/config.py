"""The daemon's settings: one pydantic model filled from a TOML file, the environment and flags.

Precedence, lowest first: defaults < the TOML file (``--config``) < environment < flags.

* Every setting is a flag of ``edgebox serve`` (``device_id`` -> ``--device-id``), except the
  broker password: argv is world-readable in /proc, so the password comes only from the config
  file, ``EDGEBOX_MQTT_PASSWORD``, ``password_file``, or systemd's credential
  ``$CREDENTIALS_DIRECTORY/mqtt-password`` (``LoadCredential=`` in the unit).
* The environment supplies only the broker credentials (``EDGEBOX_MQTT_USERNAME``,
  ``EDGEBOX_MQTT_PASSWORD``), so a stray variable cannot silently change the box's behaviour.
* The TOML file may group keys in tables (``[mqtt]``, ``[model]``, ...): tables are only for
  reading; their keys are the same flat names. An unknown key is an error naming it.

``SIGHUP`` re-reads the file; ``LIVE_SETTINGS`` apply at once, the rest need a restart.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from edgebox.daemon.schemas import DEVICE_ID_PATTERN, describe_validation_error
from edgebox.errors import EdgeboxError

PASSWORD_ENV = "EDGEBOX_MQTT_PASSWORD"
USERNAME_ENV = "EDGEBOX_MQTT_USERNAME"
CREDENTIAL_NAME = "mqtt-password"  # LoadCredential=mqtt-password:/etc/edgebox/mqtt-password
API_KEY_CREDENTIAL = "api-key"  # LoadCredential=api-key:/etc/edgebox/api-key (the HTTP API's Bearer key)
NO_BROKER = "none"  # broker = "none": HTTP only, no MQTT
# generate requests that may wait for a place in the batch, as ollama's OLLAMA_MAX_QUEUE: a burst
# from a few controllers is queued, not refused
DEFAULT_QUEUE = 512

# applied by SIGHUP without a restart
LIVE_SETTINGS = frozenset(
    {
        "budget",
        "max_in_flight",
        "max_payload_bytes",
        "max_tokens_limit",
        "telemetry_interval_s",
        "drain_timeout_s",
        "log_level",
        "config_version",
    }
)


class ConfigError(EdgeboxError):
    """A configuration that cannot be used; the message names the setting and the source."""


def _default_device_id() -> str:
    # hostnames are usually valid device ids; a FQDN's dots are allowed too
    return socket.gethostname().split(".")[0] or "edgebox"


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # the model
    model: Path | None = Field(None, description="GGUF model to serve (default: the bundled tiny model)")
    chips: int = Field(4, ge=1, le=64, description="chips to split the model over (the box has four)")
    ctx: int | None = Field(None, ge=16, description="context size (default: min(4096, the model's))")
    backend: str = Field(
        "auto",
        pattern="^(numba|onnxruntime|auto|ref)$",
        description="matmul kernels: numba, onnxruntime, auto (the faster per shape, timed once and cached) or ref",
    )
    cache_type_k: str = Field(
        "f16", pattern="^(f16|q8_0|q4_0)$", description="KV cache type of K: f16, q8_0 or q4_0 (llama.cpp's --cache-type-k)"
    )
    cache_type_v: str = Field(
        "f16", pattern="^(f16|q8_0|q4_0)$", description="KV cache type of V: f16, q8_0 or q4_0 (llama.cpp's --cache-type-v)"
    )
    weight_cache: bool | None = Field(
        None,
        description="read and write the packed-weight cache under $EDGEBOX_CACHE_DIR/packed (default: on, or EDGEBOX_WEIGHT_CACHE)",
    )
    weight_cache_gib: float | None = Field(
        None, gt=0, le=2**40, description="the packed-weight cache's size bound in GiB (default 16, or EDGEBOX_WEIGHT_CACHE_GIB)"
    )
    max_batch: int = Field(8, ge=1, le=256, description="sequences decoded together at most")
    spec: str = Field(
        "none",
        pattern="^(none|ngram|draft)$",
        description="speculative decoding: none, ngram (prompt lookup) or draft (model_draft)",
    )
    draft_max: int = Field(8, ge=1, le=64, description="most tokens drafted per sequence and step (llama.cpp --draft-max)")
    model_draft: Path | None = Field(None, description="the draft model of spec draft: a smaller GGUF with the model's tokenizer")
    kv_budget_mib: float | None = Field(None, gt=0, description="KV cache budget in MiB (default: max_batch full contexts)")
    models_dir: Path | None = Field(
        None, description="load_model accepts only files under this directory (default: the model's directory)"
    )

    # the broker
    device_id: str = Field(
        default_factory=_default_device_id,
        pattern=DEVICE_ID_PATTERN,
        description="this box's name in topics (default: the hostname)",
    )
    broker: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT, mqtts://HOST:PORT or none (HTTP only)")
    username: str | None = Field(None, description=f"broker user name (or {USERNAME_ENV})")
    password: SecretStr | None = Field(None, description=f"config file or {PASSWORD_ENV} only, never a flag")
    password_file: Path | None = Field(None, description="file holding the broker password")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate for mqtts://")
    key_file: Path | None = Field(None, description="client key for mqtts://")
    client_id: str | None = Field(
        None, max_length=128, description="MQTT client id (default: edgebox-DEVICE_ID); the persistent session is keyed by it"
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; the Last Will fires ~1.5x this after a silent loss")
    session_expiry_s: int = Field(
        7 * 86400, ge=0, description="how long the broker keeps our session (queued commands) while we are away"
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay; doubles up to reconnect_max_s")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    max_queued_messages: int = Field(4096, ge=16, description="outgoing messages paho may hold while the broker is away")

    # the HTTP API (OpenAI-compatible, beside MQTT, the same engine)
    http: str = Field("127.0.0.1:8080", description="HOST:PORT the HTTP API listens on, or none")
    api_key_file: Path | None = Field(
        None, description=f"file holding the HTTP API key (Bearer); default $CREDENTIALS_DIRECTORY/{API_KEY_CREDENTIAL}"
    )
    ssl_cert_file: Path | None = Field(None, description="serve HTTPS with this certificate (with ssl_key_file)")
    ssl_key_file: Path | None = Field(None, description="the HTTPS private key")
    http_max_body_bytes: int = Field(1024 * 1024, ge=1024, le=256 * 2**20, description="larger HTTP bodies get 413")
    metrics_need_key: bool = Field(True, description="/metrics asks for the API key too (when one is set)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (default: none, no CORS)")

    # serving
    budget: float = Field(10.0, gt=0, le=10_000, description="power budget in watts")
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=16384,
        description=f"generate requests running or queued; more get 429 (default: max_batch + {DEFAULT_QUEUE}, ollama's queue)",
    )
    max_payload_bytes: int = Field(256 * 1024, ge=1024, description="larger command payloads get 413")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    telemetry_interval_s: float = Field(5.0, ge=0.1, description="seconds between telemetry messages")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM: how long running requests may finish before they are cancelled"
    )
    governor: bool = Field(True, description="hold the budget with the power governor (false: the budget is only recorded)")
    fw_root: Path | None = Field(
        None,
        description="where the chips' firmware publishes its hwmon/cpufreq tree "
        "(default: $RUNTIME_DIRECTORY/fw, else a temporary directory)",
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    config_version: str = Field("", max_length=128, description="operator's label for this configuration, reported in state")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if v == NO_BROKER:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{v!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        if parts.username or parts.password:
            raise ValueError("put credentials in username/password settings, not in the broker URL")
        try:
            _ = parts.port  # urllib parses the port lazily: reading it validates it
        except ValueError:
            raise ValueError(f"{v!r} has a bad port") from None
        return v

    @field_validator("device_id")
    @classmethod
    def _not_fleet(cls, v: str) -> str:
        if v == "fleet":
            raise ValueError("'fleet' is reserved for the fleet's shared topics (edgebox/v1/fleet/...); choose another device id")
        return v

    @field_validator("http")
    @classmethod
    def _http_address(cls, v: str) -> str:
        if v != "none":
            http_address(v)  # raises ValueError
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return v.lower()

    # -- derived ------------------------------------------------------------------------------
    @property
    def has_broker(self) -> bool:
        return self.broker != NO_BROKER

    @property
    def http_host_port(self) -> tuple[str, int] | None:
        return None if self.http == "none" else http_address(self.http)

    def resolved_api_key(self, env: Mapping[str, str] = os.environ) -> str | None:
        """The HTTP API key: ``api_key_file``, else systemd's credential ``api-key``, else none
        (an open API, as llama-server without --api-key)."""
        path = self.api_key_file
        if path is None and env.get("CREDENTIALS_DIRECTORY"):
            candidate = Path(env["CREDENTIALS_DIRECTORY"]) / API_KEY_CREDENTIAL
            path = candidate if candidate.exists() else None
        if path is None:
            return None
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the API key from {path}: {e.strerror or e}") from None
        if not key:
            raise ConfigError(f"the API key file {path} is empty; put the key in it or remove api_key_file")
        return key

    @property
    def broker_tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts"

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker).hostname or ""

    @property
    def broker_port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.broker_tls else 1883)

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"edgebox-{self.device_id}"

    @property
    def in_flight_limit(self) -> int:
        """Generate requests accepted at once (running or queued); past it a generate gets 429."""
        return self.max_in_flight if self.max_in_flight is not None else self.max_batch + DEFAULT_QUEUE

    @property
    def kv_budget_bytes(self) -> int | None:
        return int(self.kv_budget_mib * 2**20) if self.kv_budget_mib else None

    @property
    def allowed_models_dir(self) -> Path:
        if self.models_dir is not None:
            return self.models_dir
        if self.model is not None:
            return self.model.resolve().parent
        import edgebox

        return edgebox.default_model_path().resolve().parent

    def resolved_password(self, env: Mapping[str, str] = os.environ) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        path = self.password_file
        if path is None and env.get("CREDENTIALS_DIRECTORY"):
            candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
            path = candidate if candidate.exists() else None
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"cannot read the broker password from {path}: {e.strerror or e}") from None

    def public(self) -> dict[str, Any]:
        """The settings safe to publish in state and get_status (no secrets, no key paths)."""
        hidden = {"password", "password_file", "key_file", "api_key_file", "ssl_key_file"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.model_dump().items() if k not in hidden}


FLAG_SETTINGS = tuple(name for name in DaemonConfig.model_fields if name != "password")


def read_toml(path: Path) -> dict[str, Any]:
    """The file's settings, tables flattened one level ([mqtt] broker = ... -> broker)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise ConfigError(f"{path}: [{key}.{k}]: tables nest one level only")
            if k in flat:
                raise ConfigError(f"{path}: '{k}' is set twice")
            if k not in DaemonConfig.model_fields:
                raise ConfigError(f"{path}: unknown setting '{k}' (settings: {', '.join(DaemonConfig.model_fields)})")
            flat[k] = v
    return flat


def load_config(
    path: Path | None = None, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] = os.environ
) -> DaemonConfig:
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    if env.get(USERNAME_ENV):
        values["username"] = env[USERNAME_ENV]
    if env.get(PASSWORD_ENV):
        values["password"] = env[PASSWORD_ENV]
    for key, value in (flags or {}).items():
        if key == "password":
            raise ConfigError(
                f"the password is never a flag (argv is visible to every user); use {PASSWORD_ENV} or the config file"
            )
        if value is not None:
            values[key] = value
    try:
        cfg = DaemonConfig(**values)
    except ValidationError as e:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"bad setting{where}: {describe_validation_error(e)}") from None
    if not cfg.has_broker and cfg.http == "none":
        raise ConfigError("broker = none and http = none leave the box unreachable; give one of them")
    if (cfg.ssl_cert_file is None) != (cfg.ssl_key_file is None):
        raise ConfigError("ssl_cert_file and ssl_key_file go together")
    if not cfg.broker_tls and any((cfg.ca_file, cfg.cert_file, cfg.key_file)):
        raise ConfigError("ca_file/cert_file/key_file need an mqtts:// broker URL")
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError("cert_file and key_file go together")
    if cfg.reconnect_min_s > cfg.reconnect_max_s:
        raise ConfigError("reconnect_min_s must not exceed reconnect_max_s")
    return cfg


def http_address(text: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 in brackets: "[::1]:8080") -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080), nor none")
    return host, int(port)


def live_differences(old: DaemonConfig, new: DaemonConfig) -> tuple[list[str], list[str]]:
    """-> (changed settings applied live, changed settings that need a restart)."""
    changed = [k for k in DaemonConfig.model_fields if getattr(old, k) != getattr(new, k)]
    return [k for k in changed if k in LIVE_SETTINGS], [k for k in changed if k not in LIVE_SETTINGS]

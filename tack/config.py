"""Configuration from the environment.

The variable names are the official spindle's, so an operator can swap one
spindle for the other without rewriting their unit files; tack's own knobs
carry a ``TACK_`` prefix. Every setting is declared once, in ``SETTINGS``,
which drives both parsing and ``--help`` so the two cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


# A DNS hostname (labels of letters, digits and inner hyphens), optionally with
# a port. Used for the spindle's own name and, later, to vet knot names that
# arrive in untrusted records.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}(?::|$))"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)
DID_PATTERN = r"^did:[a-z]+:[A-Za-z0-9._:%-]{1,2040}$"
_DID_RE = re.compile(DID_PATTERN)


def is_hostname(value: str) -> bool:
    """True for ``host`` or ``host:port`` with a DNS-shaped host and a valid port."""
    match = _HOSTNAME_RE.match(value)
    if not match:
        return False
    port = match.group("port")
    return port is None or 0 < int(port) < 65536


def is_did(value: str) -> bool:
    return bool(_DID_RE.match(value))


# --- parsers: each takes the raw string and returns the typed value or raises
# ValueError with a short, operator-facing explanation.


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _hostname(raw: str) -> str:
    value = raw.strip().lower()
    if not is_hostname(value):
        raise ValueError(f"must be a hostname such as ci.example.com (got {raw!r})")
    return value


def _did(raw: str) -> str:
    value = raw.strip()
    if not is_did(value):
        raise ValueError(f"must be a DID such as did:plc:abc123 (got {raw!r})")
    return value


def _listen_addr(raw: str) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"must be HOST:PORT such as 0.0.0.0:6555 (got {raw!r})")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and not is_hostname(host):
            raise ValueError(f"has an invalid host {host!r}") from None
    return host, int(port)


def _ws_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"must be a ws:// or wss:// URL (got {raw!r})")
    return value


def _http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL (got {raw!r})")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false (got {raw!r})")


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    noun = "a whole number" if kind is int else "a number"

    def parse(raw: str) -> int | float:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"must be {noun} (got {raw!r})") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {raw!r})")
        return value

    return parse


def _non_empty(raw: str) -> bool:
    """The original tack's TACK_DEV: set to anything at all means on."""
    return bool(raw)


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _go_duration(raw: str) -> float | None:
    """A Go duration ("5m", "1h30m", "90s") in seconds, as the official
    spindle reads its workflow timeout; unset is None."""
    text = raw.strip()
    if not text:
        return None
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"must be a duration such as 5m or 1h30m (got {raw!r})")
    seconds = sum(float(number) * _GO_UNITS[unit] for number, unit in parts)
    if not 1 <= seconds <= 7 * 86400:
        raise ValueError("must be from 1s to 168h")
    return seconds


def _optional_megabytes(raw: str) -> int | None:
    return _bounded(int, 16, 16 * 1024 * 1024)(raw) if raw.strip() else None


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    parse: Callable[[str], Any]
    default: str | None  # None: required
    help: str
    # The original Go tack's name for the same setting, accepted as well so
    # its unit files work unchanged; its own parser when it read the value
    # differently (TACK_DEV: any non-empty value is true).
    alias: str | None = None
    alias_parse: Callable[[str], Any] | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "SPINDLE_SERVER_HOSTNAME",
        "hostname",
        _hostname,
        None,
        "this spindle's public hostname; its DID is did:web:<hostname>",
        alias="TACK_HOSTNAME",
    ),
    Setting(
        "SPINDLE_SERVER_OWNER",
        "owner",
        _did,
        None,
        "DID of the spindle's owner, whose member invitations count",
        alias="TACK_OWNER_DID",
    ),
    Setting(
        "SPINDLE_SERVER_LISTEN_ADDR",
        "listen",
        _listen_addr,
        "0.0.0.0:6555",
        "HOST:PORT the HTTP/websocket server listens on",
        alias="TACK_LISTEN_ADDR",
    ),
    Setting(
        "SPINDLE_SERVER_DB_PATH",
        "db_path",
        _text,
        "spindle.db",
        "path of the SQLite database file",
        alias="TACK_DB_PATH",
    ),
    Setting(
        "SPINDLE_SERVER_JETSTREAM_ENDPOINT",
        "jetstream_endpoint",
        _ws_url,
        "wss://jetstream1.us-west.bsky.network/subscribe",
        "jetstream subscribe URL records are read from",
        alias="TACK_JETSTREAM_URL",
    ),
    Setting(
        "SPINDLE_SERVER_DEV",
        "dev",
        _bool,
        "false",
        "dev mode: plain ws:// and http:// to knots, loopback knots allowed",
        alias="TACK_DEV",
        alias_parse=_non_empty,
    ),
    Setting("SPINDLE_SERVER_LOG_DIR", "log_dir", _text, "logs", "directory for workflow logs"),
    Setting(
        "SPINDLE_SERVER_QUEUE_SIZE",
        "queue_size",
        _bounded(int, 1, 1_000_000),
        "1000",
        "bound of the in-memory queue of jetstream frames awaiting the applier",
    ),
    Setting(
        "SPINDLE_SERVER_MAX_JOB_COUNT",
        "max_job_count",
        _bounded(int, 1, 1024),
        "2",
        "how many workflows run at once",
    ),
    Setting(
        "SPINDLE_SERVER_PLC_URL",
        "plc_url",
        _http_url,
        "https://plc.directory",
        "PLC directory used to resolve did:plc identities",
    ),
    Setting(
        "TACK_CONFIG",
        "config_file",
        _optional_text,
        "",
        "path of the TOML file configuring backends (optional)",
    ),
    Setting(
        "TACK_LOG_LEVEL",
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "least severe log level written",
    ),
    Setting(
        "TACK_LOG_FORMAT",
        "log_format",
        _choice("json", "text"),
        "json",
        "json: one JSON object per line on stderr; text: for humans",
    ),
    Setting(
        "TACK_SECRETS_KEY",
        "secrets_key",
        _optional_text,
        "",
        "key(s) sealing repo secrets at rest: comma-separated Fernet keys; the first "
        "seals, all open (default: the key file below)",
    ),
    Setting(
        "TACK_SECRETS_KEY_FILE",
        "secrets_key_file",
        _optional_text,
        "",
        "key file used when TACK_SECRETS_KEY is unset, created with mode 0600 on first "
        "start (default: secrets.key beside the database)",
    ),
    Setting(
        "TACK_RECONNECT_MIN_SECONDS",
        "reconnect_min",
        _bounded(float, 0.01, 600),
        "1",
        "first reconnect delay for jetstream and knot streams",
    ),
    Setting(
        "TACK_RECONNECT_MAX_SECONDS",
        "reconnect_max",
        _bounded(float, 0.01, 3600),
        "60",
        "cap of the exponential reconnect delay",
    ),
    Setting(
        "TACK_KNOT_CONNECTS_PER_SECOND",
        "knot_connects_per_second",
        _bounded(float, 1, 100_000),
        "200",
        "knot stream connections begun per second at most, across all knots "
        "(knots that dropped together come back a few at a time)",
    ),
    Setting(
        "TACK_MAX_CONNECTIONS",
        "max_connections",
        _bounded(int, 16, 1_000_000),
        "4096",
        "HTTP/websocket connections open at once; past it a new one gets 503",
    ),
    Setting(
        "TACK_MAX_CONNECTIONS_PER_CLIENT",
        "max_connections_per_client",
        _bounded(int, 1, 1_000_000),
        "1024",
        "connections open at once from one client address (raise it for an appview "
        "that follows many logs from one address)",
    ),
    Setting(
        "TACK_JETSTREAM_RETENTION_HOURS",
        "jetstream_retention_hours",
        _bounded(float, 1, 100_000),
        "24",
        "how far back jetstream replays; with no cursor or an older one, tack first "
        "reads the records from the PDSes (backfill)",
    ),
    Setting(
        "TACK_RETENTION_DAYS",
        "retention_days",
        _bounded(float, 0, 100_000),
        "30",
        "days a finished workflow keeps its log and status events (0: forever); "
        "pipelines and workflows stay",
    ),
    Setting(
        "TACK_MAX_LOG_BYTES",
        "max_log_bytes",
        _bounded(int, 64 * 1024, 1 << 40),
        str(10 * 1024 * 1024),
        "bytes a workflow's log may grow to; the output after it is counted in one "
        "last line, not kept",
    ),
    Setting(
        "SPINDLE_NIXERY_PIPELINES_NIXERY",
        "nixery_registry",
        _optional_text,
        "",
        "the official spindle's nixery registry: the registry of container backends that "
        "set none (else nixery.dev)",
    ),
    Setting(
        "SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT",
        "nixery_timeout",
        _go_duration,
        "",
        "the official spindle's workflow timeout (a duration such as 5m): the timeout of "
        "container backends that set none (else 1h)",
    ),
    Setting(
        "SPINDLE_NIXERY_PIPELINES_MAX_JOB_MEMORY_MB",
        "nixery_memory_mb",
        _optional_megabytes,
        "",
        "the official spindle's memory limit per workflow in MiB: the memory of container "
        "backends that set none (else no limit)",
    ),
)

# Settings of the official spindle tack does not implement: set, each is named
# in one warning at start (their values may be secrets and are not logged).
# Any other SPINDLE_* variable tack does not know is named the same way.
UNIMPLEMENTED = (
    "SPINDLE_SERVER_SECRETS_PROVIDER",
    "SPINDLE_SERVER_SECRETS_OPENBAO_PROXY_ADDR",
    "SPINDLE_SERVER_SECRETS_OPENBAO_MOUNT",
    "SPINDLE_SERVER_MAX_CONCURRENT_WORKFLOWS",
    "SPINDLE_S3_LOG_BUCKET",
)


def unimplemented_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The official spindle's variables that are set here and that tack
    ignores, by name. ``SPINDLE_SERVER_SECRETS_PROVIDER=sqlite`` is what
    tack does anyway."""
    env = os.environ if environ is None else environ
    known = {setting.env for setting in SETTINGS}
    names = sorted(
        name
        for name in env
        if (name in UNIMPLEMENTED or name.startswith("SPINDLE_")) and name not in known
    )
    if env.get("SPINDLE_SERVER_SECRETS_PROVIDER", "").strip() == "sqlite":
        names.remove("SPINDLE_SERVER_SECRETS_PROVIDER")
    return names


@dataclass(frozen=True)
class Config:
    hostname: str
    owner: str
    listen: tuple[str, int]
    db_path: str
    jetstream_endpoint: str
    dev: bool
    log_dir: str
    queue_size: int
    max_job_count: int
    plc_url: str
    config_file: str | None
    log_level: str
    log_format: str
    secrets_key: str | None
    secrets_key_file: str | None
    reconnect_min: float
    reconnect_max: float
    knot_connects_per_second: float
    max_connections: int
    max_connections_per_client: int
    jetstream_retention_hours: float
    retention_days: float
    max_log_bytes: int
    nixery_registry: str | None
    nixery_timeout: float | None
    nixery_memory_mb: int | None

    @property
    def spindle_did(self) -> str:
        return f"did:web:{self.hostname}"

    @property
    def key_file(self) -> str:
        if self.secrets_key_file:
            return self.secrets_key_file
        return os.path.join(os.path.dirname(os.path.abspath(self.db_path)), "secrets.key")


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Read every setting; the first bad one raises ConfigError naming it."""
    env = os.environ if environ is None else environ
    config = Config(**{setting.field: _value_of(setting, env) for setting in SETTINGS})
    if config.reconnect_max < config.reconnect_min:
        raise ConfigError(
            "TACK_RECONNECT_MAX_SECONDS", "must not be below TACK_RECONNECT_MIN_SECONDS"
        )
    return config


def _value_of(setting: Setting, env: Mapping[str, str]) -> Any:
    """A setting's value from its name or the original tack's name for it.

    Given under both names, the two must mean the same: an operator who
    left one behind in a unit file must not get the other silently.
    """
    required = setting.default is None
    value = _parsed(setting.env, env.get(setting.env), setting.parse, required)
    if setting.alias is None or env.get(setting.alias) is None:
        if value is None:
            if setting.default is None:
                also = f" (nor {setting.alias})" if setting.alias else ""
                raise ConfigError(setting.env, f"is required but not set{also}")
            value = setting.parse(setting.default)
        return value
    parse = setting.alias_parse or setting.parse
    alias_value = _parsed(setting.alias, env[setting.alias], parse, required)
    if alias_value is None:
        raise ConfigError(setting.alias, "is set but empty")
    if value is not None and value != alias_value:
        raise ConfigError(
            setting.env,
            f"disagrees with {setting.alias} (two names of one setting); set only one",
        )
    return alias_value


def _parsed(name: str, raw: str | None, parse: Callable[[str], Any], required: bool) -> Any:
    """``raw`` parsed; None when it is unset (or blank, for a required setting)."""
    if raw is None or (required and not raw.strip()):
        return None
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


def read_setting(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting, parsed (its default when unset): for the admin commands,
    which need the database and log paths but not the rest."""
    env = os.environ if environ is None else environ
    return _value_of(next(s for s in SETTINGS if s.env == name), env)


def describe_settings() -> str:
    """The settings table printed by ``--help``."""
    lines = []
    for setting in SETTINGS:
        default = (
            "required" if setting.default is None else f"default: {setting.default or '(unset)'}"
        )
        also = f" (or {setting.alias}, the original tack's name)" if setting.alias else ""
        lines.append(f"  {setting.env}{also}\n      {setting.help} [{default}]")
    return "\n".join(lines)

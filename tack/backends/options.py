"""Reading one backend's options from ``tack.toml`` with errors that name the key.

Every problem raises ConfigError for ``TACK_CONFIG`` with the dotted key
(``backends.ci.timeout: must be a number``), so a misconfigured backend stops
tack at start-up with one line, never at the first workflow.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError


class Options:
    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        self.name = name
        self._raw = dict(raw)
        self._raw.pop("type", None)
        self._used: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError("TACK_CONFIG", f"backends.{self.name}.{key}: {problem}")

    def _value(self, key: str, required: bool) -> Any:
        self._used.add(key)
        if key not in self._raw:
            if required:
                raise self.fail(key, "is required")
            return None
        return self._raw[key]

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._value(key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "must be a non-empty string")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._value(key, False)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.fail(key, f"must be a number from {low} to {high}")
        return float(value)

    def argv(self, key: str, *, required: bool = False) -> list[str]:
        """A command and its arguments."""
        return self.strings(key, required=required, example='["bwrap", "--die-with-parent"]')

    def strings(self, key: str, *, required: bool = False, example: str = "") -> list[str]:
        """A non-empty list of non-empty strings; [] when absent."""
        value = self._value(key, required)
        if value is None:
            return []
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise self.fail(
                key, "must be a list of strings" + (f", e.g. {example}" if example else "")
            )
        return list(value)

    def url(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.text(key, default, required=required)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, "must be an http:// or https:// URL")
        return value.rstrip("/")

    def env_name(self, key: str, *, required: bool = False) -> str | None:
        """The name of an environment variable holding a credential, which must be set."""
        name = self.text(key, required=required)
        if name is None:
            return None
        if not os.environ.get(name):
            raise self.fail(key, f"names environment variable {name}, which is not set")
        return name

    def finish(self) -> None:
        """Unknown keys are typos until proven otherwise."""
        unknown = sorted(set(self._raw) - self._used)
        if unknown:
            raise self.fail(unknown[0], "is not an option of this backend type")

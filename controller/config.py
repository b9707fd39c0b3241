"""Controller configuration: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.errors import InvalidRequest
from common.transport.amqp import DEFAULT_URL

DEFAULT_DATABASE_URL = "sqlite:///./virtfleet.db"

ENV_VARS: Mapping[str, str] = {
    "VIRTFLEET_AMQP_URL": "amqp_url",
    "VIRTFLEET_DATABASE_URL": "database_url",
    "VIRTFLEET_DOWN_AFTER": "down_after_s",
    "VIRTFLEET_STRATEGY": "strategy",
}


@dataclass(frozen=True, slots=True)
class Overcommit:
    """Fleet-wide defaults; each host may override them (``virtfleet host set``)."""

    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0
    reserved_memory_mib: int = 512
    reserved_cpus: int = 0
    reserved_disk_gib: int = 0


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    amqp_url: str = DEFAULT_URL
    database_url: str = DEFAULT_DATABASE_URL
    #: A host whose last heartbeat is older than this is down (Nova: 60 s).
    down_after_s: float = 30.0
    #: Concurrent API requests one controller process works on.
    workers: int = 16
    strategy: str = "spread"
    #: Build attempts per create: the chosen host plus alternates (Nova: max_attempts=3).
    max_attempts: int = 3
    n_plus_one: bool = False
    #: Optimistic-claim retries when another scheduler changed the host first (placement: 10).
    claim_retries: int = 10
    #: A VM still "building" after this long, and absent from its host's reports, is failed.
    build_timeout_s: float = 600.0
    #: Seconds between reconciliation passes (drift, stuck builds).
    reconcile_interval_s: float = 30.0
    overcommit: Overcommit = field(default_factory=Overcommit)

    def __post_init__(self) -> None:
        if self.strategy not in {"spread", "pack"}:
            raise InvalidRequest(f"strategy must be 'spread' or 'pack', got {self.strategy!r}")
        if (
            not math.isfinite(self.down_after_s)
            or self.down_after_s <= 0
            or self.workers < 1
            or self.max_attempts < 1
        ):
            raise InvalidRequest("down_after_s, workers and max_attempts must be positive")
        oc = self.overcommit
        for name in ("cpu_ratio", "ram_ratio", "disk_ratio"):
            if not math.isfinite(getattr(oc, name)) or getattr(oc, name) <= 0:
                raise InvalidRequest(f"overcommit.{name} must be positive")


def _coerce(cls: type[Any], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            raise InvalidRequest(f"{where}: unknown setting {key!r}")
        default = getattr(cls(), key)
        value = raw
        if isinstance(default, bool):
            if isinstance(raw, str):
                value = raw.lower() in {"1", "true", "yes", "on"}
        elif isinstance(default, int | float) and isinstance(raw, str):
            try:
                value = type(default)(raw)
            except ValueError:
                raise InvalidRequest(f"{where}: {key} must be a number, got {raw!r}") from None
        elif isinstance(default, float) and type(raw) is int:
            value = float(raw)
        if type(value) is not type(default):
            raise InvalidRequest(f"{where}: {key} must be {type(default).__name__}, got {raw!r}")
        out[key] = value
    return out


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ControllerConfig:
    """Build the configuration from a TOML file, the environment and explicit overrides."""
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidRequest(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {path} is not valid TOML: {exc}") from None
    overcommit_values = file_values.pop("overcommit", {})
    if not isinstance(overcommit_values, dict):
        raise InvalidRequest(f"{path}: [overcommit] must be a table")
    values = _coerce(ControllerConfig, file_values, str(path))
    values.update(
        _coerce(ControllerConfig, {ENV_VARS[k]: v for k, v in env.items() if k in ENV_VARS}, "environment")
    )
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = ControllerConfig(**values)
    if overcommit_values:
        config = replace(
            config, overcommit=Overcommit(**_coerce(Overcommit, overcommit_values, "[overcommit]"))
        )
    return config

"""Controller configuration: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.broker_url import DEFAULT_URL
from common.errors import InvalidRequest
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Side, Version

DEFAULT_DATABASE_URL = "sqlite:///./virtfleet.db"

ENV_VARS: Mapping[str, str] = {
    "VIRTFLEET_AMQP_URL": "amqp_url",
    "VIRTFLEET_DATABASE_URL": "database_url",
    "VIRTFLEET_DOWN_AFTER": "down_after_s",
    "VIRTFLEET_STRATEGY": "strategy",
}
#: ``[rpc] version_cap`` from the environment: ``vm=1.0,net=1.0``.
VERSION_CAP_ENV = "VIRTFLEET_RPC_VERSION_CAP"


def parse_version_cap(value: object, where: str) -> dict[str, Version]:
    """``{"vm": "1.0"}`` or ``"vm=1.0,net=1.0"`` -> family name -> Version, checked.

    Only families the agents serve can be capped, at the same major version as this controller's
    and no newer than it: the cap says what the oldest agent of the fleet understands.
    """
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, version = item.partition("=")
            if not sep:
                raise InvalidRequest(f"{where}: expected FAMILY=MAJOR.MINOR items, got {item!r}")
            pairs[name.strip()] = version.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise InvalidRequest(f'{where}: version_cap must be a table of family = "MAJOR.MINOR"')
    agent_families = {op.family.name: op.family for op in CATALOGUE.values() if op.served_by is Side.AGENT}
    caps: dict[str, Version] = {}
    for name, raw in value.items():
        family = agent_families.get(name)
        if family is None:
            raise InvalidRequest(
                f"{where}: {name!r} is not a family the agents serve (known: {', '.join(sorted(agent_families))})"
            )
        cap = Version.parse(str(raw))
        if cap.major != family.version.major or cap > family.version:
            raise InvalidRequest(
                f"{where}: cap {name}={cap} must be {family.version.major}.x and at most {family.version}"
            )
        caps[name] = cap
    return caps


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
    #: Pick the host at random among the best N (1: always the best). Set it above 1 when
    #: several controllers place VMs at once, so they rarely race for the same host.
    choose_among: int = 1
    #: Optimistic-claim retries when another scheduler changed the host first (placement: 10).
    claim_retries: int = 10
    #: A VM still "building" after this long, and absent from its host's reports, is failed.
    build_timeout_s: float = 600.0
    #: Seconds between reconciliation passes (drift, stuck builds).
    reconcile_interval_s: float = 30.0
    #: Seconds between syncs of the in-memory fleet with the database: heartbeats are written
    #: (in one batch) and other controllers' changes read this often. Well under down_after_s.
    fleet_sync_s: float = 1.0
    #: Creates that arrive together are decided in one pass and claimed in one transaction
    #: (group commit). A batch takes what queued while the previous one ran, at most this many.
    #: 1 claims every create alone.
    create_batch_max: int = 32
    #: How long a batch waits for creates already being received (never when none is): the
    #: latency one create may gain, in seconds. 0: batch only what has queued.
    create_batch_window_s: float = 0.002
    overcommit: Overcommit = field(default_factory=Overcommit)
    #: ``[rpc] version_cap``: family -> newest version the controller may send agents (oslo's
    #: version_cap), so that the controller can be upgraded before the agents.
    version_cap: Mapping[str, Version] = field(default_factory=dict)

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
        if not math.isfinite(self.fleet_sync_s) or not 0 < self.fleet_sync_s <= self.down_after_s / 3:
            raise InvalidRequest(
                f"fleet_sync_s must be positive and at most a third of down_after_s ({self.down_after_s / 3:g} s):"
                " heartbeats reach the database that often"
            )
        if self.create_batch_max < 1:
            raise InvalidRequest(f"create_batch_max must be at least 1, got {self.create_batch_max}")
        if not math.isfinite(self.create_batch_window_s) or not 0 <= self.create_batch_window_s <= 1:
            raise InvalidRequest(
                f"create_batch_window_s must be between 0 and 1 s, got {self.create_batch_window_s}"
            )
        if self.choose_among < 1:
            raise InvalidRequest(f"choose_among must be at least 1, got {self.choose_among}")
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
    rpc_values = file_values.pop("rpc", {})
    if not isinstance(rpc_values, dict) or set(rpc_values) - {"version_cap"}:
        raise InvalidRequest(f"{path}: [rpc] takes only version_cap")
    caps = parse_version_cap(rpc_values.get("version_cap", {}), f"{path}: [rpc] version_cap")
    if VERSION_CAP_ENV in env:
        caps = parse_version_cap(env[VERSION_CAP_ENV], VERSION_CAP_ENV)
    values = _coerce(ControllerConfig, file_values, str(path))
    values.update(
        _coerce(ControllerConfig, {ENV_VARS[k]: v for k, v in env.items() if k in ENV_VARS}, "environment")
    )
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = ControllerConfig(**values, version_cap=caps)
    if overcommit_values:
        config = replace(
            config, overcommit=Overcommit(**_coerce(Overcommit, overcommit_values, "[overcommit]"))
        )
    return config

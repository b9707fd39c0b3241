"""Controller configuration: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common import credentials
from common.broker_url import DEFAULT_URL, TLS_OPTIONS, checked_urls, with_tls
from common.errors import InvalidRequest
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import TIMEOUT_SECONDS, Role, Side, Timeout, Version
from common.signing import DEFAULT_CLOCK_SKEW_S, DEFAULT_GRACE_S, DEFAULT_MAX_LIFETIME_S, check_limits
from common.transport.identity import Logins
from common.transport.topology import MAX_MESSAGE_BYTES

DEFAULT_DATABASE_URL = "sqlite:///./virtfleet.db"

ENV_VARS: Mapping[str, str] = {
    "VIRTFLEET_AMQP_URL": "amqp_url",
    "VIRTFLEET_DATABASE_URL": "database_url",
    "VIRTFLEET_DOWN_AFTER": "down_after_s",
    "VIRTFLEET_STRATEGY": "strategy",
    "VIRTFLEET_MASTER_KEY_FILE": "master_key_file",
    "VIRTFLEET_TRUST_BROKER_LOGINS": "trust_broker_logins",
}
#: Settings that may carry a password: also read from ``KEY_file``, ``VIRTFLEET_..._FILE`` or a
#: systemd credential (:mod:`common.credentials`).
SECRET_SETTINGS = (credentials.AMQP_URL, credentials.DATABASE_URL)
#: ``[rpc] version_cap`` from the environment: ``vm=1.0,net=1.0``.
VERSION_CAP_ENV = "VIRTFLEET_RPC_VERSION_CAP"
#: ``[access.roles]`` from the environment: ``alice=operator,bob=admin`` (replaces the file's table).
ACCESS_ROLES_ENV = "VIRTFLEET_ACCESS_ROLES"
#: ``[access] rate_per_s`` from the environment (0: no limit), e.g. for benchmarks.
ACCESS_RATE_ENV = "VIRTFLEET_ACCESS_RATE_PER_S"
#: The roles a broker login can be given (agent and controller logins are not API callers).
PERSON_ROLES = (Role.READER, Role.OPERATOR, Role.ADMIN)


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


def parse_roles(value: object, where: str) -> dict[str, Role]:
    """``{"alice": "operator"}`` or ``"alice=operator,bob=admin"`` -> broker login -> Role, checked."""
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            login, sep, name = item.partition("=")
            if not sep or not login.strip():
                raise InvalidRequest(f"{where}: expected LOGIN=ROLE items, got {item!r}")
            pairs[login.strip()] = name.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise InvalidRequest(f'{where}: roles must be a table of login = "reader|operator|admin"')
    names = ", ".join(r.value for r in PERSON_ROLES)
    roles: dict[str, Role] = {}
    for login, raw in value.items():
        held = next((r for r in PERSON_ROLES if r.value == raw), None)
        if held is None:
            raise InvalidRequest(f"{where}: login {login!r} has role {raw!r}; a role is one of {names}")
        roles[str(login)] = held
    return roles


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """``[access]``: what each broker login may do, and how fast (see docs/security.md).

    Secure by default: a login not named in ``roles`` may call nothing.
    """

    #: broker login (the AMQP user_id the broker validated) -> its role
    roles: Mapping[str, Role] = field(default_factory=dict)
    #: state-changing calls (role operator or admin) each login may make per second; 0: no limit
    rate_per_s: float = 10.0
    #: how many of them may come at once (the token bucket's size)
    burst: int = 50
    #: read-only calls per login per second; 0: no limit (reads have their own lane and workers)
    read_rate_per_s: float = 0.0
    #: how many reads may come at once
    read_burst: int = 100

    def __post_init__(self) -> None:
        for name in ("rate_per_s", "read_rate_per_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"access.{name} must be 0 (no limit) or positive, got {value!r}")
        if self.burst < 1 or self.read_burst < 1:
            raise InvalidRequest("access.burst and access.read_burst must be at least 1")


@dataclass(frozen=True, slots=True)
class Overcommit:
    """Fleet-wide defaults; each host may override them (``virtfleet host set``)."""

    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0
    reserved_memory_mib: int = 512
    reserved_cpus: int = 0
    reserved_disk_gib: int = 0


#: The shortest request journal retention: an API request may be delivered (or redelivered) up
#: to its expiry, at most the slowest timeout class after it was sent.
MIN_RETENTION_S = TIMEOUT_SECONDS[Timeout.SLOW]


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
    #: A transaction that fails for a transient database reason (connection lost, the server
    #: restarting, a deadlock or serialization failure: nothing committed) is run again for up
    #: to this many seconds, with jittered exponential waits, before the client gets the
    #: retryable StoreUnavailable (oslo.db's retry_on_deadlock / retry_on_disconnect).
    db_retry_s: float = 15.0
    #: A VM still "building" after this long, and absent from its host's reports, is failed.
    build_timeout_s: float = 600.0
    #: Seconds between reconciliation passes (stuck builds, claims that no VM holds).
    reconcile_interval_s: float = 30.0
    #: Seconds between looks for work left by a dead controller (builds and tasks whose owner
    #: instance has expired) and attempts at the reconciler lease (controller.recovery).
    recovery_interval_s: float = 5.0
    #: Each controller process moves its liveness record this often ...
    instance_heartbeat_s: float = 3.0
    #: ... and is taken for dead when it has not for this long (at least twice the heartbeat).
    instance_expiry_s: float = 15.0
    #: How long the reconciler lease lasts without renewal (renewed with every heartbeat): the
    #: longest a dead holder keeps the other controllers from the reconciliation passes.
    lease_ttl_s: float = 15.0
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
    access: AccessConfig = field(default_factory=AccessConfig)
    #: The fleet master secret (``virtfleet-controller keys init``; mode 0600): commands are
    #: signed with each host's key and reports must be. Empty: messages are neither signed nor
    #: checked (a warning at start; docs/security.md, "Message signatures").
    master_key_file: str = ""
    #: Seconds after ``keys rotate`` during which the previous key generation is still accepted.
    key_grace_s: float = DEFAULT_GRACE_S
    #: The longest ``expires_at - sent_at`` a signed message may have (at least the slowest
    #: timeout class); it bounds how long message ids are remembered against replays.
    max_message_lifetime_s: float = DEFAULT_MAX_LIFETIME_S
    #: How far in the future a message's ``sent_at`` may be (clock differences between machines).
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
    #: ``[security] controller_login / agent_login``: who the broker logins of the fleet are
    logins: Logins = field(default_factory=Logins)
    #: ``[security] trust_broker_logins``: False only on a development broker where every party
    #: logs in as one user; then nothing checks who a message is from (logged loudly)
    trust_broker_logins: bool = True
    #: The largest message body published or handled (the broker's ``max_message_size`` should
    #: be the same: docs/security.md, "Limits").
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: Seconds the API request journal keeps a request's answer (controller.request_journal): a
    #: redelivery or a retry with the same idempotency key within it gets the recorded answer.
    request_retention_s: float = 86400.0

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
        if self.max_message_bytes < 1024:
            raise InvalidRequest(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.create_batch_max < 1:
            raise InvalidRequest(f"create_batch_max must be at least 1, got {self.create_batch_max}")
        if not math.isfinite(self.create_batch_window_s) or not 0 <= self.create_batch_window_s <= 1:
            raise InvalidRequest(
                f"create_batch_window_s must be between 0 and 1 s, got {self.create_batch_window_s}"
            )
        if not math.isfinite(self.db_retry_s) or self.db_retry_s < 0:
            raise InvalidRequest(f"db_retry_s must be 0 or more seconds, got {self.db_retry_s}")
        self._check_recovery()
        if self.choose_among < 1:
            raise InvalidRequest(f"choose_among must be at least 1, got {self.choose_among}")
        if not math.isfinite(self.request_retention_s) or self.request_retention_s < MIN_RETENTION_S:
            raise InvalidRequest(
                f"request_retention_s must be at least {MIN_RETENTION_S:g} s (the longest a request"
                f" may wait in its queue), got {self.request_retention_s}"
            )
        check_limits(self.max_message_lifetime_s, self.clock_skew_s, self.key_grace_s)
        oc = self.overcommit
        for name in ("cpu_ratio", "ram_ratio", "disk_ratio"):
            if not math.isfinite(getattr(oc, name)) or getattr(oc, name) <= 0:
                raise InvalidRequest(f"overcommit.{name} must be positive")

    def _check_recovery(self) -> None:
        """The recovery knobs (controller.recovery) hold together."""
        if not all(
            math.isfinite(v) and v > 0
            for v in (self.recovery_interval_s, self.instance_heartbeat_s, self.lease_ttl_s)
        ) or not (
            math.isfinite(self.instance_expiry_s) and self.instance_expiry_s >= 2 * self.instance_heartbeat_s
        ):
            raise InvalidRequest(
                "recovery_interval_s, instance_heartbeat_s and lease_ttl_s must be positive, and "
                f"instance_expiry_s at least twice instance_heartbeat_s ({2 * self.instance_heartbeat_s:g} s)"
            )
        if self.lease_ttl_s <= self.instance_heartbeat_s:
            raise InvalidRequest(
                f"lease_ttl_s must be longer than instance_heartbeat_s ({self.instance_heartbeat_s:g} s):"
                " the lease is renewed with every heartbeat"
            )


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


#: ``[security]`` keys that name logins (the rest are settings of :class:`ControllerConfig`).
_LOGIN_KEYS: Mapping[str, str] = {"controller_login": "controller", "agent_login": "agent"}


def _security(table: object, path: Path | None) -> tuple[Logins, dict[str, Any]]:
    """``[security]``: the fleet's broker logins, and ``trust_broker_logins``."""
    if not isinstance(table, dict) or set(table) - {*_LOGIN_KEYS, "trust_broker_logins"}:
        raise InvalidRequest(
            f"{path}: [security] takes only {', '.join(sorted(_LOGIN_KEYS))} and trust_broker_logins"
        )
    for key in _LOGIN_KEYS:
        if key in table and not isinstance(table[key], str):
            raise InvalidRequest(f"{path}: [security] {key} must be a string")
    logins = Logins(**{field_: table[key] for key, field_ in _LOGIN_KEYS.items() if key in table})
    return logins, {k: v for k, v in table.items() if k == "trust_broker_logins"}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ControllerConfig:
    """Build the configuration from a TOML file, the environment and explicit overrides.

    ``amqp_url`` and ``database_url`` may also come from files (``amqp_url_file`` in the TOML
    file, ``VIRTFLEET_AMQP_URL_FILE``, the systemd credential ``amqp-url``; the same for the
    database): see :mod:`common.credentials`. ``amqp_ca_file``, ``amqp_cert_file``,
    ``amqp_key_file`` and ``amqp_server_name`` in the TOML file add TLS options to the broker URL
    (:func:`common.broker_url.with_tls`).
    """
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
    access = _access(file_values.pop("access", {}), env, path)
    logins, security = _security(file_values.pop("security", {}), path)
    env_values = {ENV_VARS[k]: v for k, v in env.items() if k in ENV_VARS}
    for secret in SECRET_SETTINGS:
        credentials.take_from_table(file_values, secret, str(path))
        from_env = credentials.from_environment(env, secret)
        if from_env is not None:
            env_values[secret.key] = from_env
    tls = {key: file_values.pop(key) for key in TLS_OPTIONS.values() if key in file_values}
    for key, value in tls.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"{path}: {key} must be a string, got {value!r}")
    values = _coerce(ControllerConfig, {**file_values, **security}, str(path))
    values.update(_coerce(ControllerConfig, env_values, "environment"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # One URL or several (a cluster's nodes), comma-separated; TLS options apply to each.
    values["amqp_url"] = checked_urls(with_tls(values.get("amqp_url", DEFAULT_URL), tls))
    config = ControllerConfig(**values, version_cap=caps, access=access, logins=logins)
    if overcommit_values:
        config = replace(
            config, overcommit=Overcommit(**_coerce(Overcommit, overcommit_values, "[overcommit]"))
        )
    return config


def _access(values: object, env: Mapping[str, str], path: Path | None) -> AccessConfig:
    """``[access]`` of the file (its ``roles`` subtable included), then the environment."""
    if not isinstance(values, dict):
        raise InvalidRequest(f"{path}: [access] must be a table")
    values = dict(values)
    roles = parse_roles(values.pop("roles", {}), f"{path}: [access.roles]")
    if ACCESS_ROLES_ENV in env:
        roles = parse_roles(env[ACCESS_ROLES_ENV], ACCESS_ROLES_ENV)
    settings = _coerce(AccessConfig, values, f"{path}: [access]")
    if ACCESS_RATE_ENV in env:
        settings.update(_coerce(AccessConfig, {"rate_per_s": env[ACCESS_RATE_ENV]}, ACCESS_RATE_ENV))
    return AccessConfig(roles=roles, **settings)

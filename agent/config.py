"""Agent configuration: TOML file < environment < command-line flags.

The TOML file holds an ``[agent]`` table (or the same keys at the top level)::

    [agent]
    host_id = "hv1"
    libvirt_uri = "qemu:///system"
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    state_dir = "/var/lib/virtfleet/agent/hv1"
    report_interval = 30
    heartbeat_interval = 5
    storage_pool = "default"
    images_dir = "/var/lib/virtfleet/images"   # where a missing dir pool is created (real hosts)
    log_level = "INFO"
    simulate_hw_virt = true                    # test:/// hosts only: pretend /dev/kvm + vmx/svm
    dedicated_cpus = "2-7"                     # pinned one per vCPU to dedicated-policy VMs (default none)
    shared_cpus = "0-1"                        # shared VMs and emulator threads (default: the rest)
    reserved_cpus = ""                         # left to the host alone (default none)
    key_file = "/etc/virtfleet/keys/hv1.key"   # this host's signing key (keys enroll; mode 0600)
    max_message_lifetime = 900                 # longest expires_at - sent_at accepted (>= 600)
    clock_skew = 30                            # how far in the future a sent_at may be
    controller_login = "controller"            # the only broker login whose commands are obeyed
    trust_broker_logins = true                 # false: no identity check (development broker only)
    max_message_bytes = 8388608                # the largest message published or handled
    allowed_devices = ["/dev/vg0/db"]          # block devices usable as disks outside any pool
    hugepage_max_share = 0.5                   # hugepage pools together at most this share of MemTotal

    [agent.pools.iso]                          # more storage pools (the default pool is always one)
    path = "/srv/iso"
    formats = ["raw"]                          # default: every format
    devices = false                            # block/char devices inside it (default false)

Every path a command names must lie inside a storage pool (:mod:`agent.storage_pools`): the
libvirt pool ``storage_pool`` (its directory) and the ``[agent.pools.NAME]`` tables.

The three CPU sets are cpuset strings (``0-3,^2,8``); they must be disjoint, and they are checked
against the host's online CPUs when the agent starts (:mod:`agent.tuning.cpusets`).

Without ``key_file`` commands are not checked and reports not signed (a warning at start; see
docs/security.md, "Message signatures"). With several hosts it names each host's file with
``{host}`` (``/etc/virtfleet/keys/{host}.key``).

Environment: ``VIRTFLEET_AMQP_URL``, ``VIRTFLEET_AGENT_HOST_ID``, ``VIRTFLEET_LIBVIRT_URI``,
``VIRTFLEET_AGENT_KEY_FILE``, ``VIRTFLEET_TRUST_BROKER_LOGINS`` (docs/security.md, "Identity checks").
The broker URL carries a password: it may also be read from a file, named by ``amqp_url_file``
in the TOML file, by ``VIRTFLEET_AMQP_URL_FILE`` or by the systemd credential ``amqp-url``
(:mod:`common.credentials`); a password given with ``--amqp-url`` is warned about.
``amqp_ca_file``, ``amqp_cert_file``, ``amqp_key_file`` and ``amqp_server_name`` add TLS options
to an ``amqps://`` URL (:mod:`common.broker_url`).
:func:`resolve` is pure (unit-tested); :func:`load` adds argv parsing and file reading.

One process may serve several hosts (:class:`MultiHostConfig`, :func:`resolve_hosts`):
``--simulate N --node-template FILE`` adds N libvirt test-driver hosts named
``<host prefix><number>`` (each opens the template on its own, so each has private state), and
``--host ID=URI`` (repeatable) adds one host each. Every other setting applies to all of them;
``--state-dir`` is then the root under which each host gets ``<root>/<host id>``, and the
single-host ``host_id``/``libvirt_uri`` (flags refused, environment and file ignored) do not apply.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.storage_pools import StoragePool, parse_devices, parse_pools
from agent.tuning import cpusets
from common import credentials
from common.broker_url import DEFAULT_URL, TLS_OPTIONS, checked_urls, with_tls
from common.errors import InvalidRequest
from common.signing import DEFAULT_CLOCK_SKEW_S, DEFAULT_GRACE_S, DEFAULT_MAX_LIFETIME_S, check_limits
from common.transport.topology import MAX_MESSAGE_BYTES
from common.validation import check_host_id, check_name

DEFAULT_REPORT_INTERVAL = 30.0
DEFAULT_HEARTBEAT_INTERVAL = 5.0
DEFAULT_STORAGE_POOL = "default"
DEFAULT_IMAGES_DIR = Path("/var/lib/virtfleet/images")
DEFAULT_STATE_ROOT = Path("/var/lib/virtfleet/agent")
DEFAULT_HOST_PREFIX = "sim-"
#: Share of MemTotal that hugepage pools may take together: pages are taken from the host at once,
#: and a host left without memory for itself dies.
DEFAULT_HUGEPAGE_SHARE = 0.5
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: environment variable -> config key
ENVIRONMENT: Mapping[str, str] = {
    "VIRTFLEET_AMQP_URL": "amqp_url",
    "VIRTFLEET_AGENT_HOST_ID": "host_id",
    "VIRTFLEET_LIBVIRT_URI": "libvirt_uri",
    "VIRTFLEET_AGENT_KEY_FILE": "key_file",
    "VIRTFLEET_TRUST_BROKER_LOGINS": "trust_broker_logins",
}

_KEYS = frozenset(
    {
        "host_id",
        "libvirt_uri",
        "amqp_url",
        "state_dir",
        "report_interval",
        "heartbeat_interval",
        "storage_pool",
        "images_dir",
        "log_level",
        "simulate_hw_virt",
        "dedicated_cpus",
        "shared_cpus",
        "reserved_cpus",
        "key_file",
        "max_message_lifetime",
        "clock_skew",
        "pools",
        "allowed_devices",
        "hugepage_max_share",
        "controller_login",
        "trust_broker_logins",
        "max_message_bytes",
        *TLS_OPTIONS.values(),
    }
)
#: What ``key_file`` holds in place of the host id when one process serves several hosts.
HOST_PLACEHOLDER = "{host}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host_id: str
    libvirt_uri: str
    amqp_url: str = DEFAULT_URL
    state_dir: Path = DEFAULT_STATE_ROOT
    report_interval: float = DEFAULT_REPORT_INTERVAL
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    storage_pool: str = DEFAULT_STORAGE_POOL
    images_dir: Path = DEFAULT_IMAGES_DIR
    log_level: str = "INFO"
    simulate_hw_virt: bool = True
    #: CPU sets (cpuset strings; None = default: nothing dedicated or reserved, the rest shared)
    dedicated_cpus: str | None = None
    shared_cpus: str | None = None
    reserved_cpus: str | None = None
    #: this host's key file (``virtfleet-controller keys enroll``); None: no signatures
    key_file: Path | None = None
    max_message_lifetime: float = DEFAULT_MAX_LIFETIME_S
    clock_skew: float = DEFAULT_CLOCK_SKEW_S
    #: storage pools besides the libvirt pool ``storage_pool`` (whose directory is always one)
    pools: tuple[StoragePool, ...] = ()
    #: block or character devices usable outside any pool
    allowed_devices: frozenset[str] = frozenset()
    #: share of MemTotal all hugepage pools together may take
    hugepage_max_share: float = DEFAULT_HUGEPAGE_SHARE

    #: the broker login of the controller: commands from any other login are refused
    controller_login: str = "controller"
    #: False only on a development broker where every party logs in as one user (no identity check)
    trust_broker_logins: bool = True
    #: the largest message body published or handled (as the broker's ``max_message_size``)
    max_message_bytes: int = MAX_MESSAGE_BYTES


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"config {key}: expected a non-empty string, got {value!r}")
    return value


def _interval(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidRequest(f"config {key}: expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidRequest(f"config {key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _cpuset(key: str, value: Any) -> str | None:
    """A CPU set setting: syntax and pairwise overlap are checked here, online CPUs at start."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f'config {key}: expected a CPU list string such as "2-7", got {value!r}')
    cpusets.parse_setting(key, value)
    return value.strip()


def _share(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 0.9:
        raise InvalidRequest(
            f"config {key}: expected a share of memory above 0 and at most 0.9, got {value!r}"
        )
    return float(value)


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise InvalidRequest(f"config {key}: expected a number of bytes of at least 1024, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in {"true", "false"}:  # from the environment
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise InvalidRequest(f"config {key}: expected true or false, got {value!r}")
    return value


def file_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's keys from a parsed TOML document (``[agent]`` table or top level); unknown keys refused."""
    table = data.get("agent", data)
    if not isinstance(table, Mapping):
        raise InvalidRequest("config: [agent] must be a table")
    values = {k: v for k, v in table.items() if not (table is data and isinstance(v, Mapping))}
    credentials.take_from_table(values, credentials.AMQP_URL, "config")
    unknown = sorted(set(values) - _KEYS)
    if unknown:
        raise InvalidRequest(
            f"config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"
        )
    return values


def resolve(file: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> AgentConfig:
    """Merge the three sources (later wins; a flag of None means 'not given') and validate."""
    merged: dict[str, Any] = dict(file)
    for var, key in ENVIRONMENT.items():
        if env.get(var):
            merged[key] = env[var]
    amqp_url = credentials.from_environment(env, credentials.AMQP_URL)
    if amqp_url is not None:
        merged["amqp_url"] = amqp_url
    merged.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(merged) - _KEYS)
    if unknown:
        raise InvalidRequest(f"config: unknown key(s) {', '.join(unknown)}")

    if "host_id" not in merged:
        raise InvalidRequest(
            "a host id is required (--host-id, VIRTFLEET_AGENT_HOST_ID or host_id in the file)"
        )
    host_id = check_host_id(_str("host_id", merged["host_id"]))
    if "libvirt_uri" not in merged:
        raise InvalidRequest(
            "a libvirt URI is required (--libvirt-uri, VIRTFLEET_LIBVIRT_URI or libvirt_uri in the file)"
        )
    log_level = _str("log_level", merged.get("log_level", "INFO")).upper()
    if log_level not in LOG_LEVELS:
        raise InvalidRequest(f"config log_level: expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    state_dir = merged.get("state_dir")
    sets = {name: _cpuset(name, merged.get(name)) for name in cpusets.SET_NAMES}
    key_file = merged.get("key_file")
    max_lifetime = _interval(
        "max_message_lifetime", merged.get("max_message_lifetime", DEFAULT_MAX_LIFETIME_S)
    )
    skew = merged.get("clock_skew", DEFAULT_CLOCK_SKEW_S)
    skew = 0.0 if skew in (0, "0") else _interval("clock_skew", skew)
    check_limits(max_lifetime, skew, DEFAULT_GRACE_S)
    cpusets.check_disjoint({name: cpusets.parse_setting(name, value) for name, value in sets.items()})
    return AgentConfig(
        host_id=host_id,
        libvirt_uri=_str("libvirt_uri", merged["libvirt_uri"]),
        # One URL or several (a cluster's nodes), comma-separated.
        amqp_url=checked_urls(
            with_tls(
                _str("amqp_url", merged.get("amqp_url", DEFAULT_URL)),
                {key: _str(key, merged[key]) for key in TLS_OPTIONS.values() if key in merged},
            )
        ),
        state_dir=Path(_str("state_dir", state_dir))
        if state_dir is not None
        else DEFAULT_STATE_ROOT / host_id,
        report_interval=_interval("report_interval", merged.get("report_interval", DEFAULT_REPORT_INTERVAL)),
        heartbeat_interval=_interval(
            "heartbeat_interval", merged.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
        ),
        storage_pool=check_name(
            _str("storage_pool", merged.get("storage_pool", DEFAULT_STORAGE_POOL)), "pool"
        ),
        images_dir=Path(_str("images_dir", str(merged.get("images_dir", DEFAULT_IMAGES_DIR)))),
        log_level=log_level,
        simulate_hw_virt=_bool("simulate_hw_virt", merged.get("simulate_hw_virt", True)),
        dedicated_cpus=sets["dedicated_cpus"],
        shared_cpus=sets["shared_cpus"],
        reserved_cpus=sets["reserved_cpus"],
        key_file=Path(_str("key_file", key_file).replace(HOST_PLACEHOLDER, host_id))
        if key_file is not None
        else None,
        max_message_lifetime=max_lifetime,
        clock_skew=skew,
        pools=parse_pools(merged.get("pools", {})),
        allowed_devices=parse_devices(merged.get("allowed_devices", [])),
        hugepage_max_share=_share(
            "hugepage_max_share", merged.get("hugepage_max_share", DEFAULT_HUGEPAGE_SHARE)
        ),
        controller_login=_str("controller_login", merged.get("controller_login", "controller")),
        trust_broker_logins=_bool("trust_broker_logins", merged.get("trust_broker_logins", True)),
        max_message_bytes=_size("max_message_bytes", merged.get("max_message_bytes", MAX_MESSAGE_BYTES)),
    )


@dataclass(frozen=True, slots=True)
class MultiHostConfig:
    """Several hosts served by one process: one :class:`AgentConfig` each, alike but for the host
    id, the libvirt URI and the state directory."""

    hosts: tuple[AgentConfig, ...]

    @property
    def log_level(self) -> str:
        return self.hosts[0].log_level

    @property
    def amqp_url(self) -> str:
        return self.hosts[0].amqp_url


def simulated_hosts(count: int, template: Path, prefix: str = DEFAULT_HOST_PREFIX) -> list[tuple[str, str]]:
    """``count`` (host id, test:/// URI) pairs on one node template: ``sim-0001``... (zero-padded
    to the width of ``count``, so that they sort in order)."""
    if count < 1:
        raise InvalidRequest(f"--simulate: expected at least 1 host, got {count}")
    if not template.is_file():
        raise InvalidRequest(f"--node-template: no such file {template}")
    uri = f"test://{template.resolve()}"
    width = len(str(count))
    return [(f"{prefix}{n:0{width}d}", uri) for n in range(1, count + 1)]


def parse_host(text: str) -> tuple[str, str]:
    """``ID=URI`` of ``--host``."""
    host, sep, uri = text.partition("=")
    if not sep or not host or not uri:
        raise InvalidRequest(f"--host: expected ID=URI (e.g. hv1=test:///path/node.xml), got {text!r}")
    return host, uri


def resolve_hosts(
    file: Mapping[str, Any],
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    hosts: Sequence[tuple[str, str]],
) -> MultiHostConfig:
    """:func:`resolve` for every (host id, libvirt URI) of ``hosts``; ``state_dir`` is their root."""
    if not hosts:
        raise InvalidRequest("no host to serve")
    for key in ("host_id", "libvirt_uri"):
        if flags.get(key) is not None:
            raise InvalidRequest(
                f"--{key.replace('_', '-')} is for a single-host agent; with --simulate or --host "
                "each host has its own"
            )
    ids = [check_host_id(host) for host, _uri in hosts]
    duplicates = sorted({h for h in ids if ids.count(h) > 1})
    if duplicates:
        raise InvalidRequest(f"host id(s) given twice: {', '.join(duplicates)}")
    single = {k: v for k, v in file.items() if k not in ("host_id", "libvirt_uri")}
    quiet_env = {k: v for k, v in env.items() if ENVIRONMENT.get(k) not in ("host_id", "libvirt_uri")}
    root = flags.get("state_dir") or single.get("state_dir") or DEFAULT_STATE_ROOT
    first_id, first_uri = hosts[0]
    base = resolve(single, quiet_env, {**flags, "host_id": first_id, "libvirt_uri": first_uri})
    key_file = flags.get("key_file") or quiet_env.get("VIRTFLEET_AGENT_KEY_FILE") or single.get("key_file")
    if key_file is not None and len(ids) > 1 and HOST_PLACEHOLDER not in str(key_file):
        raise InvalidRequest(
            f"key_file: with several hosts it must name each host's file with {HOST_PLACEHOLDER} "
            f"(e.g. /etc/virtfleet/keys/{HOST_PLACEHOLDER}.key), got {key_file!r}"
        )

    def key_of(host: str) -> Path | None:
        return None if key_file is None else Path(str(key_file).replace(HOST_PLACEHOLDER, host))

    return MultiHostConfig(
        tuple(
            replace(
                base,
                host_id=host,
                libvirt_uri=_str("libvirt_uri", uri),
                state_dir=Path(root) / host,
                key_file=key_of(host),
            )
            for host, (_given, uri) in zip(ids, hosts, strict=True)
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtfleet-agent",
        description="virtfleet hypervisor agent: runs VM commands from the controller and reports host state.",
    )
    parser.add_argument("--host-id", dest="host_id", help="this host's id (the agent queue's routing key)")
    parser.add_argument(
        "--libvirt-uri", dest="libvirt_uri", help="e.g. qemu:///system or test:///path/node.xml"
    )
    parser.add_argument("--config", type=Path, help="TOML file with an [agent] table")
    parser.add_argument(
        "--amqp-url",
        dest="amqp_url",
        help=f"broker URL, or a cluster's URLs comma-separated (default {DEFAULT_URL.replace('%', '%%')}); with a password, prefer"
        " VIRTFLEET_AMQP_URL_FILE or amqp_url_file in the config file",
    )
    parser.add_argument(
        "--state-dir", dest="state_dir", help="journal directory (default /var/lib/virtfleet/agent/<host>)"
    )
    parser.add_argument(
        "--report-interval", dest="report_interval", type=float, help="seconds between full reports (30)"
    )
    parser.add_argument(
        "--heartbeat-interval", dest="heartbeat_interval", type=float, help="seconds between heartbeats (5)"
    )
    parser.add_argument(
        "--storage-pool", dest="storage_pool", help="libvirt storage pool for new disks (default)"
    )
    parser.add_argument(
        "--log-level", dest="log_level", choices=LOG_LEVELS, type=str.upper, help="INFO by default"
    )
    for name, what in (
        ("dedicated", "CPUs for dedicated-policy VMs, one per vCPU (default none)"),
        ("shared", "CPUs for shared VMs and emulator threads (default: all others)"),
        ("reserved", "CPUs left to the host (default none)"),
    ):
        parser.add_argument(f"--{name}-cpus", dest=f"{name}_cpus", metavar="CPUS", help=what)
    parser.add_argument(
        "--key-file",
        dest="key_file",
        help="this host's signing key file (mode 0600); with several hosts {host} stands for each host id",
    )
    multi = parser.add_argument_group(
        "several hosts in one process",
        "each host has its own queue, journal (<state dir>/<host id>), reports and libvirt connection",
    )
    multi.add_argument(
        "--simulate", type=int, metavar="N", help="serve N simulated hosts on --node-template's test driver"
    )
    multi.add_argument(
        "--node-template", type=Path, metavar="FILE", help="libvirt test-driver node XML of --simulate"
    )
    multi.add_argument(
        "--host-prefix",
        default=DEFAULT_HOST_PREFIX,
        help=f"host id prefix of --simulate ({DEFAULT_HOST_PREFIX}0001 ...)",
    )
    multi.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="ID=URI",
        help="serve this host too (repeatable), e.g. hv1=test:///path/node.xml",
    )
    return parser


def read_file(path: Path) -> dict[str, Any]:
    """The agent's keys from a TOML file; InvalidRequest when it cannot be read or parsed."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"config file {path} is not valid TOML: {exc}") from None
    return file_values(data)


def load(argv: Sequence[str] | None, env: Mapping[str, str]) -> AgentConfig:
    """Parse ``argv`` (argparse exits on --help or a bad flag), read the file, merge with ``env``:
    a single-host agent (InvalidRequest when ``argv`` asks for several hosts)."""
    cfg = load_any(argv, env)
    if isinstance(cfg, MultiHostConfig):
        raise InvalidRequest("--simulate and --host serve several hosts; this needs one (--host-id)")
    return cfg


def load_any(argv: Sequence[str] | None, env: Mapping[str, str]) -> AgentConfig | MultiHostConfig:
    """:func:`load`, or a :class:`MultiHostConfig` when ``argv`` has ``--simulate`` or ``--host``."""
    flags = vars(build_parser().parse_args(argv))
    config_path: Path | None = flags.pop("config")
    count: int | None = flags.pop("simulate")
    template: Path | None = flags.pop("node_template")
    prefix: str = flags.pop("host_prefix")
    given: list[str] | None = flags.pop("hosts")
    file = read_file(config_path) if config_path is not None else {}
    if count is None and not given:
        if template is not None:
            raise InvalidRequest("--node-template goes with --simulate N")
        return resolve(file, env, flags)
    hosts = [parse_host(text) for text in given or ()]
    if count is not None:
        if template is None:
            raise InvalidRequest("--simulate needs --node-template (a libvirt test-driver node XML file)")
        hosts += simulated_hosts(count, template, prefix)
    return resolve_hosts(file, env, flags, hosts)


def log_level_number(name: str) -> int:
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO

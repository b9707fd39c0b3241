"""What the fleet benchmarks share: processes that die with the script, private vhosts, throw-away
PostgreSQL databases, a raw wire-protocol client (pika + msgpack only, written from
docs/protocol.md), the libvirt test-driver floor and py-spy's collapsed stacks.

Used by bench/create_cpu.py and bench/fleet.py. Nothing here imports the product except the
catalogue's kind names and roles (the raw client routes reader calls to their own lane).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import msgpack
import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
NODE_FILE = ROOT / "tests" / "fixtures" / "nodes" / "large.xml"
API_QUEUE = "virtfleet.api"
API_READ_QUEUE = "virtfleet.api.read"
REQUESTS_EXCHANGE = "virtfleet.requests"
REPLIES_EXCHANGE = "virtfleet.replies"
TICKS = os.sysconf("SC_CLK_TCK")
PYSPY = Path(sys.executable).parent / "py-spy"


class BenchTimeout(Exception):
    """The whole script ran past ``--deadline``."""


class ApiError(Exception):
    """An API call answered ``ok: false``."""


# ------------------------------------------------------------------ helpers


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process, its waited-for children included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / TICKS, (stime + cstime) / TICKS


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (or another ``/proc/PID/status`` size such as VmHWM, the peak RSS) of a live
    process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if this script dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl -q ARGS``; its stdout. Its own session: a Ctrl-C in the terminal must not
    kill it half way through. ``VF_BENCH_RABBITMQCTL`` (a rabbitmqctl for another node) and
    ``VF_BENCH_AMQP_PORT`` (its port on 127.0.0.1) point the benches at a private broker instead of
    the shared one on 5672."""
    done = subprocess.run(
        [os.environ.get("VF_BENCH_RABBITMQCTL", "rabbitmqctl"), "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    return done.stdout


_rabbitmqctl = rabbitmqctl  # the name bench/create_cpu.py used


@contextlib.contextmanager
def private_vhost(prefix: str) -> Iterator[str]:
    """A fresh vhost with full rights for guest; its AMQP URL; deleted afterwards, even when
    interrupted while it was being created (unlike tests/vfsupport.py's)."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    try:
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        port = os.environ.get("VF_BENCH_AMQP_PORT", "5672")
        yield f"amqp://guest:guest@127.0.0.1:{port}/{quote(name, safe='')}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            rabbitmqctl("delete_vhost", name)


def vhost_of(url: str) -> str:
    """The vhost name of an AMQP URL made by :func:`private_vhost`."""
    return unquote(urlsplit(url).path.lstrip("/"))


def queue_depths(url: str) -> dict[str, int]:
    """``rabbitmqctl list_queues -p VHOST name messages`` (ready + unacknowledged) as a dict."""
    out = rabbitmqctl("list_queues", "-p", vhost_of(url), "--no-table-headers", "name", "messages")
    depths = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            depths[parts[0]] = int(parts[1])
    return depths


@contextlib.contextmanager
def throwaway_database(kind: str, tmp: Path, name: str) -> Iterator[str]:
    """A new empty database URL: a SQLite file in ``tmp``, or PostgreSQL database ``name`` on
    127.0.0.1:5432 (user postgres, trust), dropped (WITH FORCE) afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / (name + '.db')}"
        return
    import sqlalchemy as sa  # noqa: PLC0415 - only the postgres runs need it

    admin = sa.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with contextlib.suppress(Exception), admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Processes:
    """Every process this script started; all stopped on exit, last started first."""

    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path, *, pipes: bool = False
    ) -> Proc:
        """Start ``argv``; its output goes to ``cwd/NAME.log``. ``pipes``: stdin and stdout are
        pipes to this script instead (stderr still goes to the log)."""
        log = cwd / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if pipes else None,
                stdout=subprocess.PIPE if pipes else handle,
                stderr=handle if pipes else subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops them in order
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - spawned from the main thread only
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")

    def stop_all(self) -> None:
        while self.procs:
            with contextlib.suppress(Exception):
                self.procs.pop().stop()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGALRM held back for the block (cleanup must not be interrupted half
    way); delivered when it ends."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def cleanup_stack() -> Iterator[contextlib.ExitStack]:
    """An ExitStack closed with :func:`signals_held`, on any exit of the block."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        with signals_held():
            stack.close()


# ------------------------------------------------------------------ the raw wire-protocol client


def single_lane(_kind: str) -> str:
    """Every call on ``virtfleet.api`` (trees older than the read-only lane)."""
    return API_QUEUE


def role_lane(kind: str) -> str:
    """``virtfleet.api.read`` for reader-role calls, ``virtfleet.api`` for the others
    (common/transport/topology.py ``api_queue(role)``)."""
    from common.messages.catalogue import CATALOGUE  # noqa: PLC0415 - only trees that have the lane
    from common.messages.descriptor import Role  # noqa: PLC0415

    return API_READ_QUEUE if CATALOGUE[kind].role is Role.READER else API_QUEUE


#: A host's signing key: (key id ``<host>:<generation>``, the key).
HostKey = tuple[str, bytes]


def envelope(
    kind: str,
    body: dict[str, Any],
    timeout: float,
    *,
    sender: str = "bench",
    broker_expiry: bool = True,
    key: HostKey | None = None,
) -> tuple[str, bytes, pika.BasicProperties]:
    """A message's id, envelope bytes and AMQP properties (docs/protocol.md §3, §4); a caller
    of a request sets ``reply_to``. ``broker_expiry``: also the per-message AMQP expiration
    (requests have it; reports and heartbeats never expire in the broker). ``key``: signed with
    it (§4.5), as the agent of that host signs its reports."""
    rid = uuid.uuid4().hex
    now = time.time()
    env: dict[str, Any] = {
        "v": "1.1",
        "kind": kind,
        "id": rid,
        "correlation_id": None,
        "sender": sender,
        "sent_at": now,
        "expires_at": now + timeout,
        "body": body,
    }
    if key is not None:
        key_id, secret = key
        fields = ("v", "kind", "id", "correlation_id", "sender", "sent_at", "expires_at")
        signed = ["virtfleet-msg-v1", *(env[f] for f in fields), key_id, body]
        env["key_id"] = key_id
        env["sig"] = hmac.digest(secret, msgpack.packb(signed, use_bin_type=True), hashlib.sha256)
    props = pika.BasicProperties(
        content_type="application/x-msgpack",
        delivery_mode=1,
        message_id=rid,
        type=kind,
        timestamp=int(now),
        expiration=str(int(timeout * 1000)) if broker_expiry else None,
    )
    return rid, msgpack.packb(env, use_bin_type=True), props


# ------------------------------------------------------------------ signing keys (docs/security.md)


def init_keys(work: Path, env: dict[str, str]) -> dict[str, str]:
    """The fleet master file in ``work``, made by ``virtfleet-controller keys init`` of the tree
    on ``env``'s PYTHONPATH; the environment that gives a controller it. Empty when that tree has
    no signing (an older revision): its fleet then runs unsigned."""
    master = work / "master.key"
    done = subprocess.run(
        [sys.executable, "-m", "controller.main", "keys", "--master-key-file", str(master), "init"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return {"VIRTFLEET_MASTER_KEY_FILE": str(master)} if done.returncode == 0 else {}


def enroll_keys(work: Path, env: dict[str, str], hosts: list[str]) -> dict[str, str]:
    """Each host's key file in ``work``/keys (``keys enroll``, as an operator enrols hosts); the
    environment that gives an agent its key file (``{host}``: one per host of a multi-host agent).
    Empty when :func:`init_keys` made no master file."""
    master = work / "master.key"
    if not master.exists():
        return {}
    keys = work / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "controller.main", "keys", "--master-key-file", str(master)]
    subprocess.run(
        [*argv, "enroll", *hosts, "--out-dir", str(keys)], env=env, check=True, capture_output=True
    )
    return {"VIRTFLEET_AGENT_KEY_FILE": str(keys / "{host}.key")}


def host_key(path: Path) -> HostKey:
    """The newest key of a host key file (``<host> <generation> <hex>`` lines, newest first)."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            host, generation, secret = line.split()
            return f"{host}:{generation}", bytes.fromhex(secret)
    raise ValueError(f"no key in {path}")


class RawClient:
    """``api.*`` calls as docs/protocol.md describes them, with pika and msgpack only.

    ``lane``: the queue of a kind (:func:`single_lane` or :func:`role_lane`). ``confirm``:
    publisher confirms, as the product's client (off for the many-outstanding burst client,
    where a confirm round trip per publish would make the client the bottleneck).

    :meth:`call` waits for one reply; :meth:`send` + :meth:`poll` keep many outstanding.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        *,
        lane: Callable[[str], str] = single_lane,
        confirm: bool = True,
    ) -> None:
        params = pika.URLParameters(url)
        params.socket_timeout = 10
        params.blocked_connection_timeout = 30
        params.heartbeat = 30
        self.timeout = timeout
        self.lane = lane
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()
        if confirm:
            self.ch.confirm_delivery()
        # docs/protocol.md §2.2: a reply queue named after the login, bound to the replies exchange.
        login = (
            params.credentials.username if isinstance(params.credentials, pika.PlainCredentials) else "bench"
        )
        self.reply_queue = f"virtfleet.reply.{login}.{uuid.uuid4().hex}"
        self.ch.queue_declare(self.reply_queue, exclusive=True, auto_delete=True)
        self.ch.queue_bind(self.reply_queue, REPLIES_EXCHANGE, self.reply_queue)
        self.login = login
        self.replies: dict[str, dict[str, Any]] = {}
        self.waiting: set[str] = set()
        self.ch.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        env = msgpack.unpackb(body, raw=False)
        cid = env.get("correlation_id")
        if cid in self.waiting:
            self.replies[cid] = env["body"]

    def send(self, kind: str, body: dict[str, Any], timeout: float | None = None) -> str:
        """Publish one request; its id (the reply is collected by :meth:`poll`)."""
        rid, data, props = envelope(kind, body, timeout or self.timeout)
        props.reply_to = self.reply_queue
        props.user_id = self.login
        self.waiting.add(rid)
        self.ch.basic_publish(REQUESTS_EXCHANGE, self.lane(kind), data, props, mandatory=True)
        return rid

    def poll(self, time_limit: float) -> dict[str, dict[str, Any]]:
        """Replies that arrived within ``time_limit`` seconds: request id -> reply body."""
        self.conn.process_data_events(time_limit=time_limit)
        got, self.replies = self.replies, {}
        self.waiting.difference_update(got)
        return got

    def forget(self, rid: str) -> None:
        """Stop waiting for ``rid`` (timed out): a late reply is dropped."""
        self.waiting.discard(rid)
        self.replies.pop(rid, None)

    def call(self, kind: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        timeout = timeout or self.timeout
        rid = self.send(kind, body, timeout)
        try:
            deadline = time.monotonic() + timeout
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{kind}: no reply in {timeout:.0f} s")
                self.conn.process_data_events(time_limit=min(left, 1.0))
            reply = self.replies.pop(rid)
        finally:
            self.waiting.discard(rid)
        if reply.get("ok") is not True:
            raise ApiError(f"{kind}: {reply.get('error')}")
        return reply.get("result", {})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def create_body(name: str, *, wait: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "vcpus": 1, "memory_mib": 64, "disk_gib": 1}
    if not wait:
        body["wait"] = False
    return body


# ------------------------------------------------------------------ the libvirt floor

LIBVIRT_FLOOR = """
import json, sys, time, libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
conn = libvirt.open("test://" + sys.argv[1])
cycles = int(sys.argv[2])
xml = ("<domain type='test'><name>floor-{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
       "<os><type arch='x86_64'>hvm</type></os></domain>")
samples = []
for i in range(cycles + 20):
    t0 = time.perf_counter()
    dom = conn.defineXML(xml.format(i))
    dom.create()
    t1 = time.perf_counter()
    dom.destroy()
    dom.undefine()
    if i >= 20:
        samples.append((t1 - t0, time.perf_counter() - t1))
print(json.dumps(samples))
"""


def libvirt_cycles(cycles: int, node_file: Path = NODE_FILE) -> list[tuple[float, float]]:
    """Seconds per (defineXML + create, destroy + undefine) on the test driver, in a process of
    its own opening ``node_file``."""
    done = subprocess.run(
        [sys.executable, "-c", LIBVIRT_FLOOR, str(node_file), str(cycles)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [(a, b) for a, b in json.loads(done.stdout.strip().splitlines()[-1])]


def libvirt_floor(cycles: int) -> list[float]:
    """Seconds per defineXML + create + destroy + undefine on the test driver (own process)."""
    return [a + b for a, b in libvirt_cycles(cycles)]


# ------------------------------------------------------------------ py-spy's output


def load_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """Sample counts per stack (root first), from py-spy's raw or speedscope output."""
    stacks: Counter[tuple[str, ...]] = Counter()
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        frames = [f"{f['name']} ({f.get('file', '?')}:{f.get('line', 0)})" for f in doc["shared"]["frames"]]
        for prof in doc["profiles"]:
            thread = prof.get("name", "thread")
            for sample, weight in zip(prof["samples"], prof["weights"], strict=True):
                stacks[(thread, *(frames[i] for i in sample))] += int(weight)
        return stacks
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def package_of(frame: str) -> str:
    """'sqlalchemy', 'pika', 'controller', ... or 'stdlib:<module>' for a frame 'f (file:line)'."""
    file = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
    parts = file.replace("\\", "/").split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "lib" in parts and any(p.startswith("python3") for p in parts):
        return "stdlib:" + parts[-1].removesuffix(".py")
    head = parts[0] if parts else "?"
    if len(parts) == 1:  # a stdlib module shortened to its file name
        return "stdlib:" + head.removesuffix(".py")
    return head


__all__ = [
    "API_QUEUE",
    "API_READ_QUEUE",
    "NODE_FILE",
    "PYSPY",
    "ROOT",
    "TICKS",
    "ApiError",
    "BenchTimeout",
    "Proc",
    "Processes",
    "RawClient",
    "cleanup_stack",
    "cpu_seconds",
    "create_body",
    "libvirt_cycles",
    "libvirt_floor",
    "load_stacks",
    "package_of",
    "pct",
    "private_vhost",
    "queue_depths",
    "rabbitmqctl",
    "role_lane",
    "rss_mib",
    "signals_held",
    "single_lane",
    "throwaway_database",
    "vhost_of",
]

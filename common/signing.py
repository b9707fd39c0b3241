"""Message signatures: per-host keys, canonical bytes, HMAC-SHA256, mandatory expiry, replays.

Who holds what (docs/security.md, "Message signatures"):

* the controller holds the fleet **master file**: one or two generations of a 32-byte secret
  (``<generation> <created_at> <hex>`` per line, newest first, mode 0600). It derives the key of
  host H at generation G as ``HMAC-SHA256(master_G, "virtfleet-host-key|G|H")``
  (:func:`derive_host_key`), so it needs no table of keys;
* agent H holds only its **host key file**: its derived key of each generation it may use
  (``<host id> <generation> <hex>`` per line, newest first, mode 0600).

A signed envelope carries ``key_id = "<host id>:<generation>"`` and ``sig =
HMAC-SHA256(key, canonical_bytes(envelope))``. The controller signs a command to H with H's
key; H signs its reports and heartbeats with its key. :class:`SignatureCheck` is the receiving
side, a :data:`common.transport.rpc.Admission` check: unsigned, signed with an unknown or another
host's key, tampered, without ``expires_at``, living longer than the maximum lifetime, sent from
the future or replayed -> :class:`~common.errors.Unauthenticated` (the Dispatcher dead-letters
it, answers it when a reply is expected and counts it).

Key files are read with ``O_NOFOLLOW`` and refused when group or others may access them; they are
written with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600, and re-read when they change on disk
(how a rotated key reaches a running process).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from common import codec
from common.errors import InvalidRequest, Replayed, Unauthenticated
from common.messages.descriptor import TIMEOUT_SECONDS
from common.messages.envelope import Envelope
from common.transport.port import Delivery

T = TypeVar("T")

#: Bytes of a master secret (and of a derived host key: SHA-256's output).
SECRET_BYTES = 32
#: Distinguishes a message signature's input from any other use of the same key.
CANONICAL_TAG = "virtfleet-msg-v1"
#: The derivation label of a host key (the generation and the host id follow it).
HOST_KEY_LABEL = "virtfleet-host-key"
#: The longest ``expires_at - sent_at`` a receiver accepts: above the slowest timeout class
#: (600 s), and the bound of how long a message id is remembered.
DEFAULT_MAX_LIFETIME_S = 900.0
#: How far in the future a ``sent_at`` may be (clocks of the controller and hosts differ).
DEFAULT_CLOCK_SKEW_S = 30.0
#: How long after a rotation the previous generation is still accepted (and enrolled).
DEFAULT_GRACE_S = 86_400.0
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_limits(max_lifetime_s: float, clock_skew_s: float, grace_s: float) -> None:
    """A maximum lifetime below the slowest timeout class would refuse the fleet's own commands."""
    slowest = max(TIMEOUT_SECONDS.values())
    if not math.isfinite(max_lifetime_s) or max_lifetime_s < slowest:
        raise InvalidRequest(
            f"max_message_lifetime_s must be at least {slowest:g} s (the slowest timeout class), "
            f"got {max_lifetime_s:g}"
        )
    if not math.isfinite(clock_skew_s) or clock_skew_s < 0:
        raise InvalidRequest(f"clock_skew_s must be zero or more seconds, got {clock_skew_s:g}")
    if not math.isfinite(grace_s) or grace_s < 0:
        raise InvalidRequest(f"key_grace_s must be zero or more seconds, got {grace_s:g}")


class KeyFileError(InvalidRequest):
    """A key file that cannot be used: missing, a symlink, not a regular file, readable by group or
    others, or not in its format. Raised at start (exit 2) and when a changed file is re-read."""


# ------------------------------------------------------------------------------ the signature


def canonical_bytes(env: Envelope, kid: str | None = None) -> bytes:
    """What a signature covers: every envelope field but ``sig``, in a fixed order.

    The MessagePack encoding of the list ``[tag, v, kind, id, correlation_id, sender, sent_at,
    expires_at, key_id, body]``. Its maps (the body) keep the order in which they were encoded,
    and decoding keeps that order, so a receiver re-encoding a decoded envelope gets the sender's
    bytes (pinned by tests/unit/test_signing.py). ``kid``: the key id to cover in place of
    ``env.key_id`` (what :func:`sign` is about to set).
    """
    return codec.encode(
        [
            CANONICAL_TAG,
            env.version,
            env.kind,
            env.id,
            env.correlation_id,
            env.sender,
            env.sent_at,
            env.expires_at,
            env.key_id if kid is None else kid,
            env.body,
        ]
    )


def key_id(host_id: str, generation: int) -> str:
    """``<host id>:<generation>`` (host ids never contain ``:``)."""
    return f"{host_id}:{generation}"


def parse_key_id(text: str) -> tuple[str, int]:
    """(host id, generation) of a key id; Unauthenticated when it is not one."""
    host, sep, generation = text.rpartition(":")
    if not sep or not host or not (generation.isascii() and generation.isdigit()):
        raise Unauthenticated(f"malformed key id {text!r}")
    return host, int(generation)


def sign(env: Envelope, kid: str, key: bytes) -> Envelope:
    """``env`` signed with ``key``, which ``kid`` names."""
    return replace(env, key_id=kid, signature=hmac.digest(key, canonical_bytes(env, kid), hashlib.sha256))


def signature_matches(env: Envelope, key: bytes) -> bool:
    """True when ``env.sig`` is the signature of ``env`` under ``key`` (constant-time compare)."""
    if env.signature is None:
        return False
    return hmac.compare_digest(hmac.digest(key, canonical_bytes(env), hashlib.sha256), env.signature)


def derive_host_key(master: bytes, generation: int, host_id: str) -> bytes:
    """Host ``host_id``'s key of ``generation``: ``HMAC-SHA256(master, label|generation|host)``."""
    return hmac.digest(master, f"{HOST_KEY_LABEL}|{generation}|{host_id}".encode(), hashlib.sha256)


# ------------------------------------------------------------------------------ files


def write_secret_file(path: Path, text: str, *, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600, never through a symlink.

    Without ``overwrite`` an existing ``path`` is an error (``O_EXCL``); with it, a new file is
    written beside it and renamed over it, so a reader sees the old file or the new one.
    """
    target = path if not overwrite else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(target, _OPEN_NEW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already (a key file is never overwritten in place)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            target.replace(path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def read_secret_file(path: Path) -> tuple[str, tuple[int, int, int]]:
    """The text of a key file and its identity (inode, mtime ns, size); KeyFileError when it is
    missing, a symlink, not a regular file, or accessible to group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is a symlink" if path.is_symlink() else (exc.strerror or str(exc))
        raise KeyFileError(f"cannot read key file {path}: {why}") from None
    with os.fdopen(fd, "r", encoding="ascii") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others may "
                f"access it; a key file must be 0600 (chmod 600 {path}, and replace the key if "
                "it may have been read)"
            )
        try:
            text = handle.read()
        except UnicodeDecodeError:
            raise KeyFileError(f"key file {path} is not a virtfleet key file") from None
    return text, (info.st_ino, info.st_mtime_ns, info.st_size)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


class WatchedFile(Generic[T]):
    """A key file parsed once and again whenever it changes on disk (inode, mtime or size): a
    rotated key reaches a running process on its next use, one ``stat`` per use."""

    def __init__(self, path: Path, parse: Callable[[str, Path], T]) -> None:
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        text, self._identity = read_secret_file(path)
        self._value = parse(text, path)

    def get(self) -> T:
        """The parsed content, re-read first when the file changed (KeyFileError if it is now bad)."""
        identity = _file_identity(self.path)
        if identity == self._identity:
            return self._value
        with self._lock:
            if _file_identity(self.path) != self._identity:
                text, identity_read = read_secret_file(self.path)
                self._value = self._parse(text, self.path)
                self._identity = identity_read
            return self._value


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _secret(value: str, path: Path) -> bytes:
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(f"{path}: a secret must be hexadecimal") from None
    if len(secret) != SECRET_BYTES:
        raise KeyFileError(f"{path}: a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    return secret


def _generation(value: str, path: Path) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise KeyFileError(f"{path}: a generation must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ master (controller)


@dataclass(frozen=True, slots=True)
class MasterGeneration:
    """One generation of the fleet master secret."""

    number: int
    created_at: float
    secret: bytes


@dataclass(frozen=True, slots=True)
class MasterSecrets:
    """The master file: the current generation and, after a rotation, the previous one."""

    generations: tuple[MasterGeneration, ...]

    @property
    def current(self) -> MasterGeneration:
        return self.generations[0]

    def accepted(self, now: float, grace_s: float) -> tuple[MasterGeneration, ...]:
        """The current generation, and the previous one until ``grace_s`` after the rotation."""
        current = self.current
        previous = self.generations[1:2] if now < current.created_at + grace_s else ()
        return (current, *previous)

    def to_text(self) -> str:
        lines = [f"{g.number} {g.created_at:.0f} {g.secret.hex()}" for g in self.generations]
        header = (
            "# virtfleet fleet master secret (mode 0600; see docs/security.md): generation created_at secret"
        )
        return "\n".join([header, *lines]) + "\n"


def parse_master(text: str, path: Path) -> MasterSecrets:
    generations: list[MasterGeneration] = []
    for fields in _lines(text):
        if len(fields) != 3:
            raise KeyFileError(f"{path}: expected 'generation created_at secret' lines")
        try:
            created = float(fields[1])
        except ValueError:
            raise KeyFileError(f"{path}: created_at must be a number, got {fields[1]!r}") from None
        generations.append(MasterGeneration(_generation(fields[0], path), created, _secret(fields[2], path)))
    if not generations:
        raise KeyFileError(f"{path}: no master secret in it")
    generations.sort(key=lambda g: g.number, reverse=True)
    return MasterSecrets(tuple(generations[:2]))


def init_master(path: Path, now: float) -> MasterSecrets:
    """Create the master file with generation 1 (KeyFileError when it exists)."""
    master = MasterSecrets((MasterGeneration(1, now, secrets.token_bytes(SECRET_BYTES)),))
    write_secret_file(path, master.to_text())
    return master


def rotate_master(path: Path, now: float) -> MasterSecrets:
    """Add a new generation to the master file; the previous one is kept for the grace period and
    the one before it dropped."""
    old = parse_master(read_secret_file(path)[0], path)
    new = MasterGeneration(old.current.number + 1, now, secrets.token_bytes(SECRET_BYTES))
    master = MasterSecrets((new, old.current))
    write_secret_file(path, master.to_text(), overwrite=True)
    return master


# ------------------------------------------------------------------------------ host key (agent)


@dataclass(frozen=True, slots=True)
class HostKeys:
    """A host key file: one host's derived key per generation, newest first."""

    host_id: str
    keys: tuple[tuple[int, bytes], ...]

    def to_text(self) -> str:
        header = (
            f"# virtfleet host key of {self.host_id} (mode 0600; see docs/security.md): host generation key"
        )
        lines = [f"{self.host_id} {generation} {key.hex()}" for generation, key in self.keys]
        return "\n".join([header, *lines]) + "\n"


def parse_host_keys(text: str, path: Path) -> HostKeys:
    hosts: set[str] = set()
    keys: list[tuple[int, bytes]] = []
    for fields in _lines(text):
        if len(fields) != 3:
            raise KeyFileError(f"{path}: expected 'host generation key' lines")
        hosts.add(fields[0])
        keys.append((_generation(fields[1], path), _secret(fields[2], path)))
    if len(hosts) != 1:
        raise KeyFileError(f"{path}: expected the keys of exactly one host, got {sorted(hosts) or 'none'}")
    keys.sort(key=lambda k: k[0], reverse=True)
    return HostKeys(hosts.pop(), tuple(keys))


def host_keys_of(master: MasterSecrets, host_id: str, now: float, grace_s: float) -> HostKeys:
    """What ``virtfleet-controller keys enroll HOST`` hands a host: its key of each accepted generation."""
    return HostKeys(
        host_id,
        tuple(
            (g.number, derive_host_key(g.secret, g.number, host_id)) for g in master.accepted(now, grace_s)
        ),
    )


# ------------------------------------------------------------------------------ key sources


class KeySource(Protocol):
    """The keys one side signs and verifies with."""

    def signing_key(self, host_id: str, now: float) -> tuple[str, bytes]:
        """(key id, key) to sign a message to or from ``host_id``."""
        ...

    def verifying_key(self, host_id: str, generation: int, now: float) -> bytes | None:
        """``host_id``'s key of ``generation`` when this side accepts it, else None."""
        ...

    def proven(self, host_id: str, generation: int) -> None:
        """A message signed by ``host_id`` with ``generation`` was verified."""
        ...


class FleetKeys:
    """The controller's keys: every host's, derived from the master file (re-read when rotated).

    A command to host H is signed with the newest generation H has signed with (so that a
    rotation does not cut off a host that has not got its new key file yet), as long as that
    generation is still accepted; else with the current generation.
    """

    def __init__(self, master_file: Path, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        self._master = WatchedFile(master_file, parse_master)
        self._grace_s = grace_s
        self._lock = threading.Lock()
        #: host -> the newest generation it signed with (O(hosts), like the fleet in memory)
        self._proven: dict[str, int] = {}

    def signing_key(self, host_id: str, now: float) -> tuple[str, bytes]:
        accepted = self._master.get().accepted(now, self._grace_s)
        with self._lock:
            proven = self._proven.get(host_id)
        chosen = next((g for g in accepted if g.number == proven), accepted[0])
        return key_id(host_id, chosen.number), derive_host_key(chosen.secret, chosen.number, host_id)

    def verifying_key(self, host_id: str, generation: int, now: float) -> bytes | None:
        for g in self._master.get().accepted(now, self._grace_s):
            if g.number == generation:
                return derive_host_key(g.secret, generation, host_id)
        return None

    def proven(self, host_id: str, generation: int) -> None:
        with self._lock:
            if generation > self._proven.get(host_id, 0):
                self._proven[host_id] = generation


class HostKeyring:
    """An agent's keys: its own host key file (re-read when replaced), for its host only."""

    def __init__(self, key_file: Path, host_id: str) -> None:
        self._file = WatchedFile(key_file, parse_host_keys)
        self.host_id = host_id
        self._check(self._file.get())

    def _check(self, keys: HostKeys) -> HostKeys:
        if keys.host_id != self.host_id:
            raise KeyFileError(
                f"key file {self._file.path} holds the key of host {keys.host_id!r}, not of {self.host_id!r}"
            )
        return keys

    def signing_key(self, host_id: str, now: float) -> tuple[str, bytes]:
        generation, key = self._check(self._file.get()).keys[0]
        return key_id(self.host_id, generation), key

    def verifying_key(self, host_id: str, generation: int, now: float) -> bytes | None:
        if host_id != self.host_id:
            return None
        return dict(self._check(self._file.get()).keys).get(generation)

    def proven(self, host_id: str, generation: int) -> None:
        """The agent signs with its newest key whatever the controller used."""


# ------------------------------------------------------------------------------ receiving


class ReplayWindow:
    """Message ids seen, each remembered until its ``expires_at``: after that the message is
    refused as expired anyway. Bounded by the traffic of one maximum lifetime."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def seen_before(self, message_id: str, expires_at: float, now: float) -> bool:
        """True when ``message_id`` was seen and has not expired; else remember it."""
        with self._lock:
            while self._heap and self._heap[0][0] < now:
                _at, old = heapq.heappop(self._heap)
                del self._expiry[old]  # ids are unique in the heap: one entry per id remembered
            if message_id in self._expiry:
                return True
            self._expiry[message_id] = expires_at
            heapq.heappush(self._heap, (expires_at, message_id))
            return False

    def __len__(self) -> int:
        return len(self._expiry)


#: At most this many re-published copies wait for their first copy's answer at once (each holds
#: a consumer worker; a multi-host agent's pool has 16).
MAX_WAITING_COPIES = 2


def _no_answer(_message_id: str) -> object | None:
    return None


class SignatureCheck:
    """The admission check of signed messages (see the module docstring).

    ``expected_host(envelope)``: the host whose key must have signed it (the agent: its own;
    the controller: the ``host_id`` the report's body claims). ``answered(id)``: not None when
    the receiver's journal holds the reply to that id -- a second delivery of such an id is
    answered from the journal, never executed, so it is let through. A second delivery of a
    command the journal has not answered yet, that the broker did not flag ``redelivered``, is a
    copy a sender re-published (same id) after losing its broker connection while the first copy
    still runs (or a replay): with ``wait_answer(id, until)`` it waits, at most until the
    command expires, for the first copy's answer, and is then let through to be answered from
    the journal, to its own ``reply_to``: after a broker restart the first copy's reply queue
    is gone with the node, and the requester waits on a new one. Without ``wait_answer``, or if
    no answer comes in time, it is :class:`~common.errors.Replayed` and dead-lettered without an
    answer.

    An authentic message that has expired is not refused here: the Dispatcher's expiry check
    skips it (a report) or answers it with RequestTimeout (a command) without running it, and it
    is not dead-lettered, so that a backlog after an outage does not flood ``virtfleet.dead``.
    """

    def __init__(
        self,
        keys: KeySource,
        expected_host: Callable[[Envelope], str | None],
        *,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        clock: Callable[[], float] = time.time,
        answered: Callable[[str], object | None] = _no_answer,
        wait_answer: Callable[[str, float], object | None] | None = None,
    ) -> None:
        self._keys = keys
        self._expected_host = expected_host
        self.max_lifetime_s = max_lifetime_s
        self.clock_skew_s = clock_skew_s
        self._clock = clock
        self._answered = answered
        self._wait_answer = wait_answer
        #: ids whose re-published copy waits for the first copy's answer (one copy each, at most
        #: MAX_WAITING_COPIES in all: each holds a consumer worker while it waits)
        self._waiting: set[str] = set()
        self._waiting_lock = threading.Lock()
        self.window = ReplayWindow()

    def __call__(self, delivery: Delivery, op: Any) -> None:
        env = delivery.envelope
        now = self._clock()
        if env.signature is None or env.key_id is None:
            raise Unauthenticated(f"unsigned {env.kind} {env.id}: every message must be signed")
        host_id, generation = parse_key_id(env.key_id)
        expected = self._expected_host(env)
        if expected is None or host_id != expected:
            raise Unauthenticated(
                f"{env.kind} {env.id} is signed with the key of {host_id!r}, not of {expected!r}"
            )
        key = self._keys.verifying_key(host_id, generation, now)
        if key is None:
            raise Unauthenticated(f"{env.kind} {env.id}: key {env.key_id} is unknown or retired")
        if not signature_matches(env, key):
            raise Unauthenticated(f"{env.kind} {env.id}: bad signature (key {env.key_id})")
        if env.expires_at is None:
            raise Unauthenticated(f"{env.kind} {env.id} has no expires_at")
        if env.expires_at - env.sent_at > self.max_lifetime_s:
            raise Unauthenticated(
                f"{env.kind} {env.id} lives {env.expires_at - env.sent_at:.0f} s, above the "
                f"maximum of {self.max_lifetime_s:.0f} s"
            )
        if env.sent_at > now + self.clock_skew_s:
            raise Unauthenticated(
                f"{env.kind} {env.id} was sent {env.sent_at - now:.0f} s in the future "
                f"(clock skew allowance {self.clock_skew_s:.0f} s)"
            )
        if (
            self.window.seen_before(env.id, env.expires_at, now)
            and not delivery.redelivered
            and self._answered(env.id) is None
            and not self._first_copy_answered(env, op)
        ):
            raise Replayed(
                f"{env.kind} {env.id} was seen before and is not answered: a replay or a re-published copy"
            )
        self._keys.proven(host_id, generation)

    def _first_copy_answered(self, env: Envelope, op: Any) -> bool:
        """Whether the first copy of a command answered it before the command expired (waited
        for here, on this copy's worker thread). Only one copy of an id waits, and at most
        :data:`MAX_WAITING_COPIES` in all, so that copies never take every worker of the
        consumer: any further copy is refused at once, as before."""
        if self._wait_answer is None or not getattr(op, "replies", False) or env.expires_at is None:
            return False
        with self._waiting_lock:
            if env.id in self._waiting or len(self._waiting) >= MAX_WAITING_COPIES:
                return False
            self._waiting.add(env.id)
        try:
            return self._wait_answer(env.id, env.expires_at) is not None
        finally:
            with self._waiting_lock:
                self._waiting.discard(env.id)


class Signer:
    """Signs envelopes to or from a host with :class:`KeySource`'s key for it."""

    def __init__(self, keys: KeySource, *, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock

    def __call__(self, env: Envelope, host_id: str) -> Envelope:
        kid, key = self._keys.signing_key(host_id, self._clock())
        return sign(env, kid, key)


def check_reply(keys: KeySource, reply: Envelope, host_id: str, now: float) -> None:
    """A reply from the agent of ``host_id`` must be signed with that host's key; Unauthenticated
    when it is not. (A reply names the request it answers in ``correlation_id``, which the
    signature covers, so a recorded reply cannot answer another request; it needs no expiry.)"""
    if reply.signature is None or reply.key_id is None:
        raise Unauthenticated(f"unsigned reply to {reply.correlation_id} from host {host_id}")
    signer_host, generation = parse_key_id(reply.key_id)
    if signer_host != host_id:
        raise Unauthenticated(f"the reply from host {host_id} is signed with the key of {signer_host!r}")
    key = keys.verifying_key(host_id, generation, now)
    if key is None or not signature_matches(reply, key):
        raise Unauthenticated(f"the reply from host {host_id} has a bad signature (key {reply.key_id})")


def body_host(env: Envelope) -> str | None:
    """The host a report says it is from (its body's ``host_id``): whose key must have signed it."""
    host = env.body.get("host_id")
    return host if isinstance(host, str) else None


__all__ = [
    "DEFAULT_CLOCK_SKEW_S",
    "DEFAULT_GRACE_S",
    "DEFAULT_MAX_LIFETIME_S",
    "FleetKeys",
    "HostKeyring",
    "HostKeys",
    "KeyFileError",
    "KeySource",
    "MasterSecrets",
    "ReplayWindow",
    "SignatureCheck",
    "Signer",
    "body_host",
    "canonical_bytes",
    "check_limits",
    "check_reply",
    "derive_host_key",
    "host_keys_of",
    "init_master",
    "parse_host_keys",
    "parse_master",
    "rotate_master",
    "sign",
    "signature_matches",
    "write_secret_file",
]

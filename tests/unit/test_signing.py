"""Message signatures (common/signing.py): canonical form, sign/verify, expiry, replays, keys on disk."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.fakehost import build_fake_host
from agent.host_runtime import HostRuntime
from agent.journal import SqliteJournal
from common import codec
from common.errors import NotFound, Replayed, Unauthenticated
from common.messages import host, vm
from common.messages.descriptor import Side
from common.messages.envelope import Envelope, decode_envelope
from common.signing import (
    MAX_WAITING_COPIES,
    FleetKeys,
    HostKeyring,
    KeyFileError,
    ReplayWindow,
    SignatureCheck,
    Signer,
    body_host,
    canonical_bytes,
    check_reply,
    derive_host_key,
    host_keys_of,
    init_master,
    parse_master,
    read_secret_file,
    rotate_master,
    sign,
    signature_matches,
    write_secret_file,
)
from common.transport.memory import MemoryBroker
from common.transport.port import Delivery, Outcome
from common.transport.rpc import Dispatcher, HandlerTable
from controller.agent_api import AgentClient
from controller.config import ControllerConfig
from controller.main import Controller

NOW = 2_000_000_000.0
GRACE = 3600.0
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def command_env(**changes: Any) -> Envelope:
    env = Envelope(
        kind=vm.VM_START.kind,
        body={"vm": {"uuid": "u-1", "name": "web"}},
        sender="controller:c:1",
        id="id-1",
        sent_at=NOW,
        expires_at=NOW + 120,
    )
    return dataclasses.replace(env, **changes)


def delivery(env: Envelope, *, redelivered: bool = False) -> Delivery:
    return Delivery(env, "hv1", redelivered, "amq.rabbitmq.reply-to")


class StaticKeys:
    """A KeySource of one host with one key per generation."""

    def __init__(self, host_id: str = "hv1", keys: dict[int, bytes] | None = None) -> None:
        self.host_id = host_id
        self.keys = keys or {1: KEY}
        self.proven_log: list[tuple[str, int]] = []

    def signing_key(self, host_id: str, now: float) -> tuple[str, bytes]:
        generation = max(self.keys)
        return f"{host_id}:{generation}", self.keys[generation]

    def verifying_key(self, host_id: str, generation: int, now: float) -> bytes | None:
        return self.keys.get(generation) if host_id == self.host_id else None

    def proven(self, host_id: str, generation: int) -> None:
        self.proven_log.append((host_id, generation))


def check(keys: StaticKeys | None = None, **kwargs: Any) -> SignatureCheck:
    return SignatureCheck(keys or StaticKeys(), lambda _env: "hv1", clock=lambda: NOW, **kwargs)


def admit(chk: SignatureCheck, env: Envelope, *, redelivered: bool = False) -> None:
    chk(delivery(env, redelivered=redelivered), vm.VM_START)


def recording_table(calls: list[vm.VmAction]) -> HandlerTable:
    """An agent table whose ``vm.start`` records each run (and then says the VM is not there)."""

    def start(body: vm.VmAction) -> vm.VmResult:
        calls.append(body)
        raise NotFound("no such VM")

    table = HandlerTable(Side.AGENT)
    table.register(vm.VM_START, start)
    return table


# ------------------------------------------------------------------ canonical form and signature


def test_the_signature_survives_the_wire() -> None:
    signed = sign(command_env(), "hv1:1", KEY)
    received = decode_envelope(signed.encode())
    assert received.key_id == "hv1:1" and received.signature == signed.signature
    assert signature_matches(received, KEY)
    assert canonical_bytes(received) == canonical_bytes(signed)


def test_the_canonical_bytes_keep_the_senders_map_order() -> None:
    """A body whose maps are not in sorted order re-encodes to the same bytes after decoding."""
    body = {"z": 1, "a": {"y": [1, 2.5, None], "b": b"\x00\xff"}, "m": "text"}
    signed = sign(command_env(body=body), "hv1:1", KEY)
    received = decode_envelope(signed.encode())
    assert list(received.body) == ["z", "a", "m"]
    assert canonical_bytes(received) == canonical_bytes(signed)
    assert signature_matches(received, KEY)


def test_the_canonical_bytes_cover_every_field_but_the_signature() -> None:
    base = command_env()
    changed: dict[str, Any] = {
        "kind": vm.VM_DESTROY.kind,
        "body": {"vm": {"uuid": "u-2", "name": "web"}},
        "sender": "someone",
        "id": "id-2",
        "correlation_id": "c",
        "sent_at": NOW + 1,
        "expires_at": NOW + 121,
        "version": "1.9",
        "key_id": "hv1:2",
    }
    seen = {canonical_bytes(base)}
    for name, value in changed.items():
        seen.add(canonical_bytes(dataclasses.replace(base, **{name: value})))
    assert len(seen) == len(changed) + 1
    assert canonical_bytes(dataclasses.replace(base, signature=b"x")) == canonical_bytes(base)


@pytest.mark.parametrize(
    "tamper",
    [
        {"body": {"vm": {"uuid": "u-2", "name": "web"}}},
        {"kind": vm.VM_DESTROY.kind},
        {"expires_at": NOW + 600},
        {"id": "id-2"},
        {"sent_at": NOW - 1},
        {"sender": "controller:evil:1"},
    ],
    ids=["body", "kind", "expiry", "id", "sent_at", "sender"],
)
def test_a_tampered_message_is_refused(tamper: dict[str, Any]) -> None:
    forged = dataclasses.replace(sign(command_env(), "hv1:1", KEY), **tamper)
    with pytest.raises(Unauthenticated, match="bad signature"):
        admit(check(), forged)


def test_a_genuine_message_is_admitted_and_proves_its_generation() -> None:
    keys = StaticKeys()
    admit(check(keys), sign(command_env(), "hv1:1", KEY))
    assert keys.proven_log == [("hv1", 1)]


def test_an_unsigned_message_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="unsigned"):
        admit(check(), command_env())
    with pytest.raises(Unauthenticated, match="unsigned"):
        admit(check(), dataclasses.replace(sign(command_env(), "hv1:1", KEY), signature=None))


def test_another_hosts_key_is_refused() -> None:
    """Signed with hv2's (genuine) key, but it is for / claims to be from hv1."""
    keys = StaticKeys("hv2", {1: OTHER_KEY})
    chk = SignatureCheck(keys, lambda _env: "hv1", clock=lambda: NOW)
    with pytest.raises(Unauthenticated, match="key of 'hv2', not of 'hv1'"):
        admit(chk, sign(command_env(), "hv2:1", OTHER_KEY))
    # naming hv1's key id while signing with another key is a bad signature
    with pytest.raises(Unauthenticated, match="bad signature"):
        admit(check(), sign(command_env(), "hv1:1", OTHER_KEY))


def test_an_unknown_generation_or_malformed_key_id_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="unknown or retired"):
        admit(check(), sign(command_env(), "hv1:7", KEY))
    with pytest.raises(Unauthenticated, match="malformed key id"):
        admit(check(), sign(command_env(), "hv1", KEY))


def test_a_missing_expiry_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="no expires_at"):
        admit(check(), sign(command_env(expires_at=None), "hv1:1", KEY))


def test_a_lifetime_above_the_maximum_is_refused() -> None:
    chk = check(max_lifetime_s=900)
    admit(chk, sign(command_env(expires_at=NOW + 900), "hv1:1", KEY))
    with pytest.raises(Unauthenticated, match="above the maximum of 900 s"):
        admit(chk, sign(command_env(id="id-2", expires_at=NOW + 901), "hv1:1", KEY))


def test_a_sent_at_in_the_future_beyond_the_skew_is_refused() -> None:
    chk = check(clock_skew_s=30)
    admit(chk, sign(command_env(sent_at=NOW + 30, expires_at=NOW + 60), "hv1:1", KEY))
    with pytest.raises(Unauthenticated, match="in the future"):
        admit(chk, sign(command_env(id="id-2", sent_at=NOW + 31, expires_at=NOW + 60), "hv1:1", KEY))


def test_an_expired_genuine_command_is_not_run() -> None:
    """The check lets it through; the Dispatcher answers RequestTimeout without running it."""
    calls: list[vm.VmAction] = []
    table = recording_table(calls)
    dispatcher = Dispatcher("agent:hv1", table, clock=lambda: NOW + 200, admit=[check()])
    old = sign(command_env(), "hv1:1", KEY)
    outcome = dispatcher(delivery(old))
    assert calls == [] and not outcome.dead_letter
    assert outcome.reply is not None and outcome.reply.body["error"]["type"] == "RequestTimeout"


# ------------------------------------------------------------------ replays


def test_a_replay_within_the_window_is_refused() -> None:
    chk = check()
    env = sign(command_env(), "hv1:1", KEY)
    admit(chk, env)
    with pytest.raises(Replayed, match="a replay"):
        admit(chk, env)


def test_a_broker_redelivery_is_admitted() -> None:
    """The consumer died before acknowledging: the journal answers it (or it runs, if it never did)."""
    chk = check()
    env = sign(command_env(), "hv1:1", KEY)
    admit(chk, env)
    admit(chk, env, redelivered=True)


def test_a_second_delivery_the_journal_answers_is_admitted() -> None:
    """A caller's re-publish after a lost connection is answered from the journal, never run."""
    journal = {"id-1": b"reply"}
    chk = check(answered=journal.get)
    env = sign(command_env(), "hv1:1", KEY)
    admit(chk, env)
    admit(chk, env)


def test_a_re_published_copy_waits_for_the_first_copys_answer_then_is_admitted() -> None:
    """After a broker restart the first copy's reply queue is gone: the copy the requester
    re-published (same id, a new reply queue) is answered from the journal once the first is."""
    waited: list[tuple[str, float]] = []

    def wait_answer(message_id: str, until: float) -> bytes | None:
        waited.append((message_id, until))
        return b"reply"

    chk = check(wait_answer=wait_answer)
    env = sign(command_env(), "hv1:1", KEY)
    admit(chk, env)
    assert waited == []  # the first copy runs without waiting
    admit(chk, env)
    assert waited == [("id-1", NOW + 120)], "waited at most until the command expires"


def test_a_copy_whose_first_copy_never_answers_in_time_is_replayed() -> None:
    chk = check(wait_answer=lambda _id, _until: None)
    env = sign(command_env(), "hv1:1", KEY)
    admit(chk, env)
    with pytest.raises(Replayed, match="a replay"):
        admit(chk, env)


def test_only_one_copy_of_an_id_and_a_few_copies_in_all_wait() -> None:
    """Each waiting copy holds a consumer worker: a second copy of the same id, or a copy beyond
    MAX_WAITING_COPIES, is refused at once instead of taking another."""
    entered, release = threading.Barrier(MAX_WAITING_COPIES + 1), threading.Event()

    def wait_answer(_message_id: str, _until: float) -> bytes | None:
        if not release.is_set():  # the copies below that take the slots: held until released
            entered.wait(30)
            assert release.wait(30)
        return b"reply"

    chk = check(wait_answer=wait_answer)
    envs = [sign(command_env(id=f"id-{n}"), "hv1:1", KEY) for n in range(MAX_WAITING_COPIES + 1)]
    for env in envs:
        admit(chk, env)  # the first copies run
    with ThreadPoolExecutor(MAX_WAITING_COPIES) as pool:
        waiting = [pool.submit(admit, chk, env) for env in envs[:MAX_WAITING_COPIES]]
        entered.wait(30)  # every waiting slot is taken
        with pytest.raises(Replayed):
            admit(chk, envs[0])  # a second copy of an id already waiting
        with pytest.raises(Replayed):
            admit(chk, envs[-1])  # a copy beyond the bound
        release.set()
        for future in waiting:
            future.result(timeout=30)
    admit(chk, envs[-1])  # the slots are free again


def test_a_re_published_command_is_answered_from_the_journal_to_its_own_reply_queue(tmp_path: Path) -> None:
    """The whole agent side, with the real journal: the first copy runs (slowly), the copy
    re-published meanwhile waits and gets the first copy's reply; the handler ran once."""
    journal = SqliteJournal(tmp_path / "journal.db", clock=lambda: NOW)
    started, release = threading.Event(), threading.Event()
    runs: list[vm.VmAction] = []

    def start(body: vm.VmAction) -> vm.VmResult:
        runs.append(body)
        started.set()
        assert release.wait(30)
        return vm.VmResult(message="started")

    handlers = HandlerTable(Side.AGENT)
    handlers.register(vm.VM_START, start)
    chk = check(answered=journal.get, wait_answer=journal.wait_for)
    dispatcher = Dispatcher("agent:hv1", handlers, journal=journal, clock=lambda: NOW, admit=[chk])
    env = sign(command_env(), "hv1:1", KEY)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(dispatcher, Delivery(env, "hv1", False, "reply-queue-1"))
        assert started.wait(30)
        copy = pool.submit(dispatcher, Delivery(env, "hv1", False, "reply-queue-2"))
        assert not copy.done(), "the copy waits for the first copy's answer"
        release.set()
        answered, again = first.result(timeout=30), copy.result(timeout=30)
    assert len(runs) == 1
    assert not again.dead_letter and again.reply is not None
    assert answered.reply is not None
    assert again.reply.encode() == answered.reply.encode(), "the journal's copy of the first reply"
    assert again.reply.body["ok"] is True
    assert dispatcher.refused == {}
    journal.close()


def test_the_window_forgets_ids_once_they_expire() -> None:
    window = ReplayWindow()
    assert not window.seen_before("a", NOW + 10, NOW)
    assert not window.seen_before("b", NOW + 20, NOW)
    assert window.seen_before("a", NOW + 10, NOW + 5)
    assert not window.seen_before("c", NOW + 30, NOW + 15)  # a is expired: forgotten
    assert len(window) == 2
    assert not window.seen_before("a", NOW + 40, NOW + 15)


def test_forged_messages_do_not_fill_the_window() -> None:
    chk = check()
    for n in range(5):
        with pytest.raises(Unauthenticated):
            admit(chk, sign(command_env(id=f"f{n}"), "hv1:1", OTHER_KEY))
    assert len(chk.window) == 0


def test_a_dispatcher_dead_letters_refusals_counts_them_and_keeps_serving() -> None:
    calls: list[vm.VmAction] = []
    table = recording_table(calls)
    dispatcher = Dispatcher("agent:hv1", table, clock=lambda: NOW, admit=[check()])
    forged = command_env(id="f1")
    outcome = dispatcher(delivery(forged))
    assert outcome.dead_letter and outcome.reply is not None
    assert outcome.reply.body["error"]["type"] == "Unauthenticated"
    genuine = sign(command_env(), "hv1:1", KEY)
    assert not dispatcher(delivery(genuine)).dead_letter
    assert dispatcher(delivery(genuine)) == Outcome(None, dead_letter=True)  # replayed: no answer
    assert len(calls) == 1 and dispatcher.refused == {"Unauthenticated": 1, "Replayed": 1}


# ------------------------------------------------------------------ the controller's keys, rotation


def test_each_host_gets_its_own_derived_key(tmp_path: Path) -> None:
    master = init_master(tmp_path / "master.key", NOW)
    secret = master.current.secret
    assert derive_host_key(secret, 1, "hv1") != derive_host_key(secret, 1, "hv2")
    assert derive_host_key(secret, 1, "hv1") != derive_host_key(secret, 2, "hv1")
    keys = FleetKeys(tmp_path / "master.key")
    kid, key = keys.signing_key("hv1", NOW)
    assert kid == "hv1:1" and key == derive_host_key(secret, 1, "hv1")


def test_a_report_signed_with_another_hosts_key_fails_at_the_controller(tmp_path: Path) -> None:
    master = init_master(tmp_path / "master.key", NOW)
    chk = SignatureCheck(FleetKeys(tmp_path / "master.key"), body_host, clock=lambda: NOW)
    beat = Envelope(
        kind=host.HOST_HEARTBEAT.kind,
        body=codec.to_wire(host.Heartbeat(host_id="hv1", seq=1, started_at=NOW, sent_at=NOW)),
        sender="agent:hv2",
        sent_at=NOW,
        expires_at=NOW + 30,
    )
    hv2 = host_keys_of(master, "hv2", NOW, GRACE).keys[0][1]
    hv1 = host_keys_of(master, "hv1", NOW, GRACE).keys[0][1]
    with pytest.raises(Unauthenticated, match="key of 'hv2', not of 'hv1'"):
        chk(delivery(sign(beat, "hv2:1", hv2)), host.HOST_HEARTBEAT)
    with pytest.raises(Unauthenticated, match="bad signature"):
        chk(delivery(sign(beat, "hv1:1", hv2)), host.HOST_HEARTBEAT)
    chk(delivery(sign(beat, "hv1:1", hv1)), host.HOST_HEARTBEAT)


def test_rotation_accepts_the_previous_generation_in_the_grace_period_only(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    init_master(path, NOW)
    keys = FleetKeys(path, grace_s=GRACE)
    old_kid, old_key = keys.signing_key("hv1", NOW)
    rotated = rotate_master(path, NOW + 100)
    assert [g.number for g in rotated.generations] == [2, 1]
    # the running controller re-reads the rotated file: it signs with generation 2 ...
    assert keys.signing_key("hv1", NOW + 101)[0] == "hv1:2"
    # ... and still accepts generation 1 until the grace period is over
    assert keys.verifying_key("hv1", 1, NOW + 100 + GRACE - 1) == old_key
    assert keys.verifying_key("hv1", 1, NOW + 100 + GRACE) is None
    assert keys.verifying_key("hv1", 2, NOW + 100 + GRACE) is not None
    env = sign(command_env(sent_at=NOW + 100 + GRACE, expires_at=NOW + 100 + GRACE + 60), old_kid, old_key)
    late = SignatureCheck(keys, lambda _e: "hv1", clock=lambda: NOW + 100 + GRACE)
    with pytest.raises(Unauthenticated, match="unknown or retired"):
        admit(late, env)
    # a second rotation drops generation 1 altogether
    assert [g.number for g in rotate_master(path, NOW + 200).generations] == [3, 2]


def test_commands_use_the_generation_the_host_proved_until_it_moves_on(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    init_master(path, NOW)
    keys = FleetKeys(path, grace_s=GRACE)
    keys.proven("hv1", 1)
    rotate_master(path, NOW + 10)
    assert keys.signing_key("hv1", NOW + 20)[0] == "hv1:1"  # hv1 has no new key file yet
    assert keys.signing_key("hv2", NOW + 20)[0] == "hv2:2"  # never seen: the current one
    keys.proven("hv1", 2)
    assert keys.signing_key("hv1", NOW + 20)[0] == "hv1:2"
    keys.proven("hv1", 1)  # an old report arriving late does not move it back
    assert keys.signing_key("hv1", NOW + 20)[0] == "hv1:2"
    assert keys.signing_key("hv3", NOW + 10 + GRACE)[0] == "hv3:2"


def test_an_agent_with_a_rotated_key_file_signs_with_the_new_generation(tmp_path: Path) -> None:
    master_path, key_path = tmp_path / "master.key", tmp_path / "hv1.key"
    master = init_master(master_path, NOW)
    write_secret_file(key_path, host_keys_of(master, "hv1", NOW, GRACE).to_text())
    ring = HostKeyring(key_path, "hv1")
    fleet = FleetKeys(master_path, grace_s=GRACE)
    signer = Signer(ring, clock=lambda: NOW)
    chk = SignatureCheck(fleet, body_host, clock=lambda: NOW + 20)
    beat = command_env(body={"host_id": "hv1"}, kind=host.HOST_HEARTBEAT.kind)
    assert signer(beat, "hv1").key_id == "hv1:1"
    rotated = rotate_master(master_path, NOW + 10)
    enrolled = host_keys_of(rotated, "hv1", NOW + 10, GRACE)
    assert [g for g, _k in enrolled.keys] == [2, 1]
    write_secret_file(key_path, enrolled.to_text(), overwrite=True)
    signed = signer(dataclasses.replace(beat, id="id-2"), "hv1")
    assert signed.key_id == "hv1:2"
    chk(delivery(signed), host.HOST_HEARTBEAT)
    # the agent still verifies commands the controller signs with generation 1 meanwhile
    assert ring.verifying_key("hv1", 1, NOW) == derive_host_key(master.current.secret, 1, "hv1")
    assert ring.verifying_key("hv2", 1, NOW) is None


# ------------------------------------------------------------------ key files on disk


def test_key_files_are_written_0600_and_never_overwritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    init_master(path, NOW)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyFileError, match="exists already"):
        init_master(path, NOW)
    rotate_master(path, NOW + 1)
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]  # no temporary file left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    init_master(path, NOW)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}: group or others"):
        FleetKeys(path)


def test_a_key_file_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    init_master(tmp_path / "real.key", NOW)
    (tmp_path / "link.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(KeyFileError, match="symlink"):
        read_secret_file(tmp_path / "link.key")
    with pytest.raises(KeyFileError, match="exists already"):
        write_secret_file(tmp_path / "link.key", "x")


def test_a_missing_or_malformed_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="No such file"):
        FleetKeys(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    write_secret_file(bad, "1 2 abcd\n")
    with pytest.raises(KeyFileError, match="must be 32 bytes"):
        FleetKeys(bad)
    with pytest.raises(KeyFileError, match="no master secret"):
        parse_master("# nothing\n", bad)


def test_a_host_key_file_of_another_host_is_refused(tmp_path: Path) -> None:
    master = init_master(tmp_path / "master.key", NOW)
    write_secret_file(tmp_path / "hv2.key", host_keys_of(master, "hv2", NOW, GRACE).to_text())
    with pytest.raises(KeyFileError, match="key of host 'hv2', not of 'hv1'"):
        HostKeyring(tmp_path / "hv2.key", "hv1")


def test_the_master_file_is_not_world_readable_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_master(tmp_path / "master.key", NOW)
    finally:
        os.umask(old)
    assert (tmp_path / "master.key").stat().st_mode & 0o077 == 0


def test_the_recipe_of_the_protocol_reference_gives_the_same_signature() -> None:
    """docs/protocol.md §4.5, followed with msgpack and hmac only (as bench/fleetkit.py does)."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    import msgpack  # noqa: PLC0415

    env = command_env(correlation_id="c-1")
    fields = [env.version, env.kind, env.id, env.correlation_id, env.sender, env.sent_at, env.expires_at]
    data = msgpack.packb(["virtfleet-msg-v1", *fields, "hv1:1", env.body], use_bin_type=True)
    assert sign(env, "hv1:1", KEY).signature == hmac.digest(KEY, data, hashlib.sha256)


def test_a_reply_must_be_signed_with_the_key_of_the_host_that_was_called(tmp_path: Path) -> None:
    master = init_master(tmp_path / "master.key", NOW)
    keys = FleetKeys(tmp_path / "master.key")
    hv1 = host_keys_of(master, "hv1", NOW, GRACE).keys[0][1]
    hv2 = host_keys_of(master, "hv2", NOW, GRACE).keys[0][1]
    reply = command_env().reply_ok({}, "agent:hv1")
    check_reply(keys, sign(reply, "hv1:1", hv1), "hv1", NOW)
    with pytest.raises(Unauthenticated, match="unsigned reply"):
        check_reply(keys, reply, "hv1", NOW)
    with pytest.raises(Unauthenticated, match="signed with the key of 'hv2'"):
        check_reply(keys, sign(reply, "hv2:1", hv2), "hv1", NOW)
    with pytest.raises(Unauthenticated, match="bad signature"):
        check_reply(keys, sign(reply, "hv1:1", hv2), "hv1", NOW)
    # a recorded reply does not answer another request: the correlation id is signed
    moved = dataclasses.replace(sign(reply, "hv1:1", hv1), correlation_id="another-request")
    with pytest.raises(Unauthenticated, match="bad signature"):
        check_reply(keys, moved, "hv1", NOW)


class ReplyingTransport:
    """Answers every call with what the test says (a forged reply, say)."""

    def __init__(self, answer: Callable[[Envelope], Envelope]) -> None:
        self.answer = answer

    def call(self, _exchange: str, _key: str, env: Envelope, _timeout: float, **_kw: object) -> Envelope:
        return self.answer(env)


def test_the_controller_refuses_a_reply_its_agent_did_not_sign(tmp_path: Path) -> None:
    master = init_master(tmp_path / "master.key", NOW)
    keys = FleetKeys(tmp_path / "master.key")
    hv2 = host_keys_of(master, "hv2", NOW, GRACE).keys[0][1]
    forged = ReplyingTransport(lambda env: sign(env.reply_error(NotFound("gone"), "agent:hv1"), "hv2:1", hv2))
    client = AgentClient(
        forged,  # type: ignore[arg-type]
        "controller",
        sign=Signer(keys),
        check_reply=lambda reply, host: check_reply(keys, reply, host, time.time()),
    )
    with pytest.raises(Unauthenticated, match="signed with the key of 'hv2'"):
        client.call("hv1", vm.VM_START, vm.VmAction(vm.VmRef("u-1", "web")))


def test_a_controller_or_agent_with_a_key_file_others_may_read_does_not_start(tmp_path: Path) -> None:
    init_master(tmp_path / "master.key", NOW)
    (tmp_path / "master.key").chmod(0o644)
    config = ControllerConfig(
        amqp_url="memory://x",
        database_url=f"sqlite:///{tmp_path / 'db'}",
        master_key_file=str(tmp_path / "master.key"),
    )
    with pytest.raises(KeyFileError, match="mode 0644: group or others may access it"):
        Controller(config, memory=MemoryBroker())
    assert not (tmp_path / "db").exists()  # refused before anything was touched

    fake = build_fake_host(tmp_path / "agent", host_id="hv1")
    write_secret_file(tmp_path / "hv1.key", "hv1 1 " + "00" * 32 + "\n")
    (tmp_path / "hv1.key").chmod(0o640)
    cfg = dataclasses.replace(fake.config, key_file=tmp_path / "hv1.key")
    with pytest.raises(KeyFileError, match="mode 0640"):
        HostRuntime(cfg, fake.hypervisor, MemoryBroker().transport("agent-hv1"), alive=lambda: True)

"""Synthetic report load for bench/fleet.py ``--ingest-synthetic N``: fake hosts that speak the
wire protocol with raw pika + msgpack (bench/fleetkit.py's envelope; docs/protocol.md §3, §4,
§6.7, §8); of the product only the report kinds, from their descriptors.

One process publishes for a slice of the fake hosts (``--first``, ``--count`` of ``--hosts``):

1. **register**: a first full ``host.report`` for each of its hosts, with publisher confirms
   and ``mandatory`` (a nack, i.e. the queue's ``x-max-length`` reached, is retried after a
   pause), then ``{"event": "registered"}`` on stdout and a wait for a ``go`` line on stdin;
2. **paced**: for ``--seconds``, heartbeats at ``hosts / heartbeat_every`` per second and full
   reports at ``hosts / report_every`` per second (this slice's share), paced evenly, on a
   channel without confirms (as fast as the agent's own transient publishes; drops by a full
   queue would show as a queue at its limit). A report repeats its host's last content
   (``seq``, times and the VMs' CPU time aside) except with probability ``--change``, when one
   VM changes power state and the free memory moves, as on an idle fleet. Each second it
   prints cumulative counts, how far behind schedule it is, and the share of its wall time
   spent building and publishing (``busy``: above ~0.8 one process is the limit).

The host model (:func:`host_model`) is deterministic per host index, so bench/fleet.py can
insert database rows that match the VMs the reports list.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetkit import HostKey, envelope, host_key

from common.messages.host import HOST_HEARTBEAT, HOST_REPORT

EXCHANGE = "virtfleet.reports"
CPU_CHOICES = (32, 48, 64, 96)
MEMORY_CHOICES_MIB = (256 * 1024, 384 * 1024, 512 * 1024)
VM_VCPUS = (1, 2, 4)
VM_MEMORY_MIB = (1024, 2048, 4096, 8192)
VM_DISK_GIB = (10, 20, 40)


def host_id(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}"


def vm_uuid(hid: str, j: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{hid}.vm{j}.virtfleet-bench"))


@dataclass
class FakeHost:
    """What one fake host reports; ``vms`` are wire VmStatus maps."""

    host_id: str
    cpus: int
    memory_mib: int
    disk_gib: int
    vms: list[dict[str, Any]]
    started_at: float = 0.0
    seq: int = 0
    hb_seq: int = 0
    memory_free_mib: int = 0
    pool_used_gib: int = 0
    #: each VM's disk, GiB (not in the report: for the database rows bench/fleet.py inserts)
    vm_disks: list[int] = field(default_factory=list)

    def body(self, now: float) -> dict[str, Any]:
        self.seq += 1
        for vm in self.vms:  # CPU time moves in every report (the controller ignores it)
            if vm["state"] == "running":
                vm["cpu_time_ns"] += 5_000_000_000 * vm["vcpus"]
        return {
            "host_id": self.host_id,
            "hostname": self.host_id + ".bench.example",
            "agent_version": "0.1.0",
            "hypervisor_type": "QEMU",
            "hypervisor_version": "7.2.0",
            "libvirt_uri": "qemu:///system",
            "hw_virt": True,
            "cpu": {
                "cpus": self.cpus,
                "sockets": 2,
                "cores": self.cpus // 4,
                "threads": 2,
                "numa_cells": 2,
                "mhz": 2600,
                "model": "EPYC-Milan",
            },
            "memory_mib": self.memory_mib,
            "memory_free_mib": self.memory_free_mib,
            "storage": {
                "name": "default",
                "path": "/var/lib/libvirt/images",
                "capacity_gib": self.disk_gib,
                "allocation_gib": self.pool_used_gib,
                "available_gib": self.disk_gib - self.pool_used_gib,
            },
            "networks": ["default"],
            "bridges": ["br0"],
            "vms": self.vms,
            "seq": self.seq,
            "started_at": self.started_at,
            "reported_at": now,
        }

    def change(self, rng: random.Random) -> None:
        """One VM changes power state; free memory follows."""
        if not self.vms:
            self.memory_free_mib = max(0, self.memory_free_mib - 1)
            return
        vm = rng.choice(self.vms)
        vm["state"] = "shutoff" if vm["state"] == "running" else "running"
        delta = vm["memory_mib"] if vm["state"] == "shutoff" else -vm["memory_mib"]
        self.memory_free_mib = max(0, self.memory_free_mib + delta)


def host_model(prefix: str, index: int, vms: int, seed: int = 11) -> FakeHost:
    """Host ``index``: deterministic size and VMs (a mix of sizes, 80 % running)."""
    rng = random.Random(seed * 1_000_003 + index)
    hid = host_id(prefix, index)
    cpus = rng.choice(CPU_CHOICES)
    memory = rng.choice(MEMORY_CHOICES_MIB)
    statuses = []
    disks = []
    used_memory = 0
    for j in range(vms):
        vcpus = rng.choice(VM_VCPUS)
        mem = rng.choice(VM_MEMORY_MIB)
        state = "running" if rng.random() < 0.8 else "shutoff"
        disks.append(rng.choice(VM_DISK_GIB))
        if state == "running":
            used_memory += mem
        statuses.append(
            {
                "uuid": vm_uuid(hid, j),
                "name": f"{hid}-vm{j}",
                "state": state,
                "vcpus": vcpus,
                "max_vcpus": vcpus,
                "memory_mib": mem,
                "max_memory_mib": mem,
                "cpu_time_ns": rng.randrange(10**12),
                "autostart": rng.random() < 0.5,
                "persistent": True,
                "managed": True,
            }
        )
    host = FakeHost(hid, cpus, memory, 2000, statuses, vm_disks=disks)
    host.memory_free_mib = memory - 4096 - used_memory
    host.pool_used_gib = sum(disks)
    return host


class Publisher:
    def __init__(self, url: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 60
        params.blocked_connection_timeout = 60
        self.conn = pika.BlockingConnection(params)
        self.confirmed = self.conn.channel()
        self.confirmed.confirm_delivery()
        self.fast = self.conn.channel()

    def publish(
        self,
        kind: str,
        hid: str,
        body: dict[str, Any],
        ttl: float,
        *,
        confirm: bool,
        key: HostKey | None = None,
    ) -> None:
        _mid, data, props = envelope(kind, body, ttl, sender="agent:" + hid, broker_expiry=False, key=key)
        channel = self.confirmed if confirm else self.fast
        channel.basic_publish(EXCHANGE, f"{kind}.{hid}", data, props, mandatory=confirm)


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", default="syn-")
    p.add_argument("--hosts", type=int, required=True, help="hosts of the whole synthetic fleet")
    p.add_argument("--first", type=int, default=0, help="first host index of this process")
    p.add_argument("--count", type=int, help="hosts of this process (default: all)")
    p.add_argument("--vms", type=int, default=10, help="VMs per host")
    p.add_argument("--seconds", type=float, default=40.0, help="paced phase")
    p.add_argument("--heartbeat-every", type=float, default=5.0)
    p.add_argument("--report-every", type=float, default=30.0)
    p.add_argument("--change", type=float, default=0.1, help="share of reports that change")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--key-dir", type=Path, help="sign as each host with DIR/<host>.key (a signed controller)")
    args = p.parse_args()
    count = args.hosts - args.first if args.count is None else args.count
    rng = random.Random(args.seed + args.first)
    started = time.time()
    hosts = [host_model(args.prefix, args.first + i, args.vms, args.seed) for i in range(count)]
    for h in hosts:
        h.started_at = started
    keys: dict[str, HostKey | None] = {
        h.host_id: host_key(args.key_dir / f"{h.host_id}.key") if args.key_dir else None for h in hosts
    }
    pub = Publisher(args.url)

    # 1. register: every host's first report, confirmed
    t0, c0 = time.monotonic(), cpu_now()
    nacks = 0
    for h in hosts:
        body = h.body(time.time())
        while True:
            try:
                pub.publish(HOST_REPORT.kind, h.host_id, body, 120.0, confirm=True, key=keys[h.host_id])
                break
            except pika.exceptions.NackError:
                nacks += 1  # the report queue is at its x-max-length: let the controller drain it
                pub.conn.sleep(0.5)
    emit(
        event="registered",
        count=count,
        seconds=time.monotonic() - t0,
        cpu_s=cpu_now() - c0,
        nacks=nacks,
    )
    line = sys.stdin.readline()
    if not line.startswith("go"):
        return 0

    # 2. paced heartbeats and reports
    hb_rate = count / args.heartbeat_every
    rep_rate = count / args.report_every
    sent_hb = sent_rep = changed = 0
    hb_next = rep_next = 0
    busy = 0.0
    max_lag = 0.0
    t0, c0 = time.monotonic(), cpu_now()
    end = t0 + args.seconds
    next_tick = t0 + 1.0
    emit(event="paced", t=time.time(), hb=0, rep=0, changed=0, cpu_s=0.0, busy=0.0, lag_s=0.0)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        elapsed = now - t0
        due_hb = int(elapsed * hb_rate)
        due_rep = int(elapsed * rep_rate)
        lag = max(
            (due_hb - sent_hb) / hb_rate if hb_rate else 0.0,
            (due_rep - sent_rep) / rep_rate if rep_rate else 0.0,
        )
        max_lag = max(max_lag, lag)
        b0 = time.perf_counter()
        while sent_hb < due_hb or sent_rep < due_rep:
            if sent_hb < due_hb:
                h = hosts[hb_next]
                hb_next = (hb_next + 1) % count
                h.hb_seq += 1
                wall = time.time()
                body = {"host_id": h.host_id, "seq": h.hb_seq, "started_at": h.started_at, "sent_at": wall}
                pub.publish(HOST_HEARTBEAT.kind, h.host_id, body, 30.0, confirm=False, key=keys[h.host_id])
                sent_hb += 1
            if sent_rep < due_rep:
                h = hosts[rep_next]
                rep_next = (rep_next + 1) % count
                if rng.random() < args.change:
                    h.change(rng)
                    changed += 1
                pub.publish(
                    HOST_REPORT.kind,
                    h.host_id,
                    h.body(time.time()),
                    120.0,
                    confirm=False,
                    key=keys[h.host_id],
                )
                sent_rep += 1
        busy += time.perf_counter() - b0
        if now >= next_tick:
            emit(
                event="paced",
                t=time.time(),
                hb=sent_hb,
                rep=sent_rep,
                changed=changed,
                cpu_s=cpu_now() - c0,
                busy=busy / max(1e-9, now - t0),
                lag_s=lag,
            )
            next_tick += 1.0
        # the next message due, at most 5 ms away (keeps the pace even; pika's I/O runs meanwhile)
        wait = min(
            (sent_hb + 1) / hb_rate - elapsed if hb_rate else 1.0,
            (sent_rep + 1) / rep_rate - elapsed if rep_rate else 1.0,
            0.005,
        )
        pub.conn.sleep(max(0.0, wait))
    elapsed = time.monotonic() - t0
    emit(
        event="done",
        t=time.time(),
        hb=sent_hb,
        rep=sent_rep,
        changed=changed,
        seconds=elapsed,
        cpu_s=cpu_now() - c0,
        busy=busy / elapsed,
        max_lag_s=max_lag,
    )
    pub.conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

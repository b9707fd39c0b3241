"""Benchmark of the pure scheduler: latency of place() and place_indexed(), packing quality.

Run: ``python bench/placement_pure.py [--quick]`` from the repository root.

Fleets are drawn from four host models (cores at vCPU ratio 4.0, memory with 512 MiB
reserved, local disk with 20 GiB reserved) with a fixed seed; VMs from seven flavours:
four balanced sizes plus memory-, CPU- and disk-heavy shapes (see ``FLAVOURS``).

Latency: p50/p99 wall time (and p50 CPU time) of one ``place()`` call on fleets of 100,
1,000 and 10,000 hosts with random usage up to 80% (2% down, 1% disabled, 1% in
maintenance, 10% lacking the VM's network), default spread policy, ranked list bounded
as by default; then the same with N+1 on. Each request is decided twice on the same
fleet: by ``place()`` over the snapshot (the full walk, the reference) and by
``place_indexed()`` over a :class:`HostIndex` of it; the two must choose the same host
and alternates. ``x`` is full p50 / indexed p50. A third policy, ``max_ranked=0``, keeps
only the chosen host and alternates in ``ranked`` (what a create needs; ``--dry-run``
wants the default ten).

Index upkeep: building the index (per host) and re-upserting a host after a claim, as
the controller does on every claim, report and status change.

Packing quality: an empty fleet of 100 hosts receives a seeded stream of VMs, one
``place()`` + claim each, with each policy. Two figures:

* ``first refusal``: VMs placed before the first refusal, against the *prefix bound*:
  the largest k such that the first k VMs of the same stream fit the fleet's total
  capacity in every resource at once (as if VMs could be split across hosts). Nothing
  can do better, so the ratio is <= 1; what is missing was lost to fragmentation;
* ``filled``: refused VMs are skipped and the stream goes on until 200 refusals in a
  row (the fleet is full for every flavour). VMs placed against the *mean bound*,
  ``min over resources of total capacity / mean VM size of the stream``: how many
  average VMs the fleet holds by volume. Not strict (at the end small VMs still fit
  where big ones do not, which can push the ratio a little above what average VMs
  would reach), so the utilisation of the bottleneck resource is printed as well.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.scheduler import (
    FleetSnapshot,
    HostIndex,
    HostState,
    Inventory,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    ResourceClass,
    Strategy,
    apply_claim,
    apply_placement,
    place,
    place_indexed,
)

R = ResourceClass
SEED = 20240501
NETWORKS = ("default", "prod", "storage", "mgmt")
# (vcpu, memory MiB, disk GiB): small, medium, large, xlarge, then memory-heavy,
# CPU-heavy and disk-heavy shapes so that no single resource decides everything.
FLAVOURS = (
    (1, 2048, 20),
    (2, 4096, 40),
    (4, 8192, 80),
    (8, 16384, 160),
    (2, 32768, 40),
    (16, 8192, 40),
    (2, 4096, 400),
)
FLAVOUR_WEIGHTS = (25, 20, 15, 10, 10, 10, 10)
RESOURCES = (R.VCPU, R.MEMORY_MIB, R.DISK_GIB)


# (physical cores, memory MiB, disk GiB) of the host models, roughly as bought.
HOST_MODELS = ((16, 131072, 1000), (32, 262144, 2000), (64, 524288, 4000), (96, 786432, 4000))


def random_host(rng: random.Random, index: int, *, empty: bool = False) -> HostState:
    """A host of a random model; unless ``empty``, random usage and occasional bad state."""
    cores, memory, disk = rng.choice(HOST_MODELS)
    inventories = {
        R.VCPU: Inventory.for_class(R.VCPU, cores, allocation_ratio=4.0),
        R.MEMORY_MIB: Inventory.for_class(R.MEMORY_MIB, memory, reserved=512),
        R.DISK_GIB: Inventory.for_class(R.DISK_GIB, disk, reserved=20),
    }
    used = {} if empty else {rc: int(inv.capacity * rng.uniform(0.0, 0.8)) for rc, inv in inventories.items()}
    roll = rng.random()
    return HostState(
        host_id=f"host-{index:05d}",
        inventories=inventories,
        used=used,
        up=empty or roll >= 0.02,
        down_since=None if empty or roll >= 0.02 else 1_700_000_000.0,
        enabled=empty or not 0.02 <= roll < 0.03,
        maintenance=not empty and 0.03 <= roll < 0.04,
        networks=frozenset(NETWORKS) if empty else frozenset(n for n in NETWORKS if rng.random() < 0.9),
        bridges=frozenset({"br0"}),
        vm_count=0 if empty else rng.randint(0, 60),
        max_vms=None if empty else 100,
    )


def random_request(rng: random.Random, index: int) -> PlacementRequest:
    """A VM from the flavour mix, attached to the default network."""
    vcpu, memory, disk = rng.choices(FLAVOURS, weights=FLAVOUR_WEIGHTS)[0]
    return PlacementRequest(
        vm_name=f"vm-{index}",
        resources={R.VCPU: vcpu, R.MEMORY_MIB: memory, R.DISK_GIB: disk},
        networks=frozenset({"default"}),
        needs_hw_virt=True,
    )


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class Latency:
    """Wall-clock p50/p99 (ms) of both searches on one fleet, their CPU p50, the indexed CPU p99."""

    full_p50: float
    full_p99: float
    full_cpu: float
    indexed_p50: float
    indexed_p99: float
    indexed_cpu: float
    indexed_cpu_p99: float


def fleet(hosts: int) -> tuple[list[HostState], random.Random]:
    """The seeded random fleet of ``hosts`` hosts and the generator to draw requests from."""
    rng = random.Random(SEED + hosts)
    return [random_host(rng, i) for i in range(hosts)], rng


def latency(hosts: int, runs: int, policy: PlacementPolicy) -> Latency:
    """place() and place_indexed() on the same random fleet and requests."""
    states, rng = fleet(hosts)
    snapshot = FleetSnapshot(hosts=tuple(states), now=1_700_000_600.0)
    index = HostIndex(states)
    requests = [random_request(rng, i) for i in range(runs)]
    place(snapshot, requests[0], policy)  # warm up
    place_indexed(index, requests[0], policy)
    samples: dict[str, tuple[list[float], list[float]]] = {"full": ([], []), "indexed": ([], [])}
    for request in requests:
        results = []
        deciders: tuple[tuple[str, Callable[[PlacementRequest], Placement | Refusal]], ...] = (
            ("full", partial(place, snapshot, policy=policy)),
            ("indexed", partial(place_indexed, index, policy=policy, now=snapshot.now)),
        )
        for name, decide in deciders:
            wall, cpu = samples[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            result = decide(request)
            cpu.append((time.thread_time() - start_cpu) * 1000.0)
            wall.append((time.perf_counter() - start) * 1000.0)
            assert isinstance(result, Placement), "bench fleet should have room"
            results.append((result.host_id, result.alternates))
        assert results[0] == results[1], f"indexed placement differs: {results}"
    (full_wall, full_cpu), (indexed_wall, indexed_cpu) = samples["full"], samples["indexed"]
    return Latency(
        full_p50=percentile(full_wall, 0.50),
        full_p99=percentile(full_wall, 0.99),
        full_cpu=percentile(full_cpu, 0.50),
        indexed_p50=percentile(indexed_wall, 0.50),
        indexed_p99=percentile(indexed_wall, 0.99),
        indexed_cpu=percentile(indexed_cpu, 0.50),
        indexed_cpu_p99=percentile(indexed_cpu, 0.99),
    )


def identical(hosts: int, creates: int) -> tuple[float, float]:
    """A fleet of identical empty hosts (a fresh rack; the simulated fleet) filled by ``creates``
    small spread creates, each decided by place() and place_indexed() (which must agree) and
    claimed: ms per decision, full walk and indexed. Ties everywhere: the case where a walk
    that cannot stop inside a run of equal hosts degrades to the full fleet."""
    cores, memory, disk = HOST_MODELS[0]
    inventories = {
        R.VCPU: Inventory.for_class(R.VCPU, cores, allocation_ratio=4.0),
        R.MEMORY_MIB: Inventory.for_class(R.MEMORY_MIB, memory, reserved=512),
        R.DISK_GIB: Inventory.for_class(R.DISK_GIB, disk, reserved=20),
    }
    states = [HostState(host_id=f"sim-{i:05d}", inventories=inventories) for i in range(hosts)]
    index = HostIndex(states)
    by_id = {state.host_id: state for state in states}
    request = PlacementRequest(vm_name="vm", resources={R.VCPU: 1, R.MEMORY_MIB: 64, R.DISK_GIB: 1})
    policy = PlacementPolicy()
    full = indexed = 0.0
    for _ in range(creates):
        start = time.perf_counter()
        expected = place(FleetSnapshot(hosts=tuple(by_id.values())), request, policy)
        middle = time.perf_counter()
        got = place_indexed(index, request, policy)
        indexed += time.perf_counter() - middle
        full += middle - start
        assert isinstance(got, Placement) and isinstance(expected, Placement)
        assert (got.host_id, got.alternates) == (expected.host_id, expected.alternates)
        claimed = apply_claim(by_id[got.host_id], request)
        by_id[got.host_id] = claimed
        index.upsert(claimed)
    return full * 1000.0 / creates, indexed * 1000.0 / creates


def upkeep(hosts: int, runs: int) -> tuple[float, float, float]:
    """Index build time per host (µs), then p50/p99 (µs) of one upsert after a claim."""
    states, rng = fleet(hosts)
    start = time.perf_counter()
    index = HostIndex(states)
    build = (time.perf_counter() - start) * 1e6 / hosts
    request = random_request(rng, 0)
    claimed = [apply_claim(rng.choice(states), request) for _ in range(runs)]
    times: list[float] = []
    for state in claimed:
        start = time.perf_counter()
        index.upsert(state)
        times.append((time.perf_counter() - start) * 1e6)
    return build, percentile(times, 0.50), percentile(times, 0.99)


@dataclass(frozen=True)
class Packing:
    """Outcome of filling one fleet with one policy (see the module docstring)."""

    first_refusal: int
    prefix_bound: int
    filled: int
    mean_bound: float
    bottleneck: str
    bottleneck_used: float


def packing(strategy: Strategy, hosts: int = 100) -> Packing:
    """Fill an empty fleet with a seeded VM stream under ``strategy``."""
    rng = random.Random(SEED)
    snapshot = FleetSnapshot(hosts=tuple(random_host(rng, i, empty=True) for i in range(hosts)))
    capacity = {rc: sum(h.inventories[rc].capacity for h in snapshot.hosts) for rc in RESOURCES}
    stream_rng = random.Random(SEED + 1)
    policy = PlacementPolicy(strategy=strategy, max_ranked=0)
    stream: list[PlacementRequest] = []
    first_refusal: int | None = None
    placed = refusals_in_a_row = 0
    while refusals_in_a_row < 200:
        request = random_request(stream_rng, len(stream))
        stream.append(request)
        result = place(snapshot, request, policy)
        if not isinstance(result, Placement):
            refusals_in_a_row += 1
            first_refusal = placed if first_refusal is None else first_refusal
            continue
        refusals_in_a_row = 0
        snapshot = apply_placement(snapshot, request, result)
        placed += 1
    assert first_refusal is not None
    totals = dict.fromkeys(RESOURCES, 0)
    prefix_bound = 0
    for request in stream:
        for rc in RESOURCES:
            totals[rc] += request.resources.get(rc, 0)
        if any(totals[rc] > capacity[rc] for rc in RESOURCES):
            break
        prefix_bound += 1
    per_resource = {
        rc: capacity[rc] / statistics.fmean(r.resources.get(rc, 0) for r in stream) for rc in RESOURCES
    }
    bottleneck = min(per_resource, key=per_resource.__getitem__)
    used = sum(h.used.get(bottleneck, 0) for h in snapshot.hosts)
    return Packing(
        first_refusal=first_refusal,
        prefix_bound=prefix_bound,
        filled=placed,
        mean_bound=per_resource[bottleneck],
        bottleneck=bottleneck.label,
        bottleneck_used=100.0 * used / capacity[bottleneck],
    )


def main() -> None:
    """Print the latency table and the packing figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer runs (for CI smoke tests)")
    args = parser.parse_args()
    runs = {100: 400, 1_000: 200, 10_000: 200}
    if args.quick:
        runs = {100: 50, 1_000: 20, 10_000: 5}
    # CPU time is printed too: on a shared machine the wall-clock figures include time
    # spent waiting for a core, the CPU figure is what the search itself costs.
    print("placement latency (ms): place() full walk vs place_indexed() over a HostIndex")
    print(
        f"{'hosts':>7} {'policy':>14} {'full p50':>9} {'p99':>8} {'cpu p50':>8}"
        f" {'index p50':>9} {'p99':>8} {'cpu p50':>8} {'cpu p99':>8} {'x p50':>7}"
    )
    for hosts, count in runs.items():
        for label, policy in (
            ("spread", PlacementPolicy()),
            ("spread+N+1", PlacementPolicy(n_plus_one=True)),
            ("max_ranked=0", PlacementPolicy(max_ranked=0)),
        ):
            lat = latency(hosts, count, policy)
            print(
                f"{hosts:>7} {label:>14} {lat.full_p50:>9.2f} {lat.full_p99:>8.2f} {lat.full_cpu:>8.2f}"
                f" {lat.indexed_p50:>9.2f} {lat.indexed_p99:>8.2f} {lat.indexed_cpu:>8.2f} {lat.indexed_cpu_p99:>8.2f}"
                f" {lat.full_p50 / lat.indexed_p50:>7.1f}"
            )
    print()
    print("identical hosts (ties everywhere), spread creates claimed one by one: ms per decision")
    print(f"{'hosts':>7} {'creates':>8} {'full':>8} {'indexed':>8} {'x':>6}")
    for hosts, creates in ((1_000, 100 if args.quick else 1_500),):
        full_ms, indexed_ms = identical(hosts, creates)
        print(f"{hosts:>7} {creates:>8} {full_ms:>8.3f} {indexed_ms:>8.3f} {full_ms / indexed_ms:>6.1f}")
    print()
    print("index upkeep (µs)")
    print(f"{'hosts':>7} {'build/host':>10} {'upsert p50':>10} {'p99':>8}")
    for hosts in runs:
        build, p50, p99 = upkeep(hosts, 50 if args.quick else 1000)
        print(f"{hosts:>7} {build:>10.1f} {p50:>10.1f} {p99:>8.1f}")
    print()
    print("packing quality: 100 empty hosts, seeded VM stream")
    print(
        f"{'policy':>7} {'1st refusal':>11} {'prefix bound':>12} {'ratio':>6}"
        f" {'filled':>7} {'mean bound':>10} {'ratio':>6}  bottleneck used"
    )
    for strategy in (Strategy.PACK, Strategy.SPREAD):
        p = packing(strategy)
        print(
            f"{strategy.value:>7} {p.first_refusal:>11} {p.prefix_bound:>12} {p.first_refusal / p.prefix_bound:>6.3f}"
            f" {p.filled:>7} {p.mean_bound:>10.1f} {p.filled / p.mean_bound:>6.3f}"
            f"  {p.bottleneck} {p.bottleneck_used:.1f}%"
        )


if __name__ == "__main__":
    main()

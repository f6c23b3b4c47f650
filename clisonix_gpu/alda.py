"""ALDA: deterministic schedules that split work across devices (GPUs, or CPU worker slots).

``plan`` is a pure function: the same item count, devices and alignment give the same contiguous
shards, byte for byte in ``to_json()``, in every process. Shard sizes follow the device weights by
the largest-remainder method in exact rational arithmetic (ties to the lower device index), so no
floating-point rounding can make two processes disagree. ``DeviceManager.map`` runs a
row-independent op shard by shard and concatenates in order: with a batch-invariant op such as
``transform_matrix`` or the binary ops, the result is bit-identical whatever the device count.

>>> devices = parse_devices("cpu:0=2,cpu:1=1")
>>> plan(10, devices)[1].start
7
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fractions
import heapq
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "Device",
    "DeviceManager",
    "Schedule",
    "Shard",
    "ShardError",
    "TaskSchedule",
    "discover",
    "parse_devices",
    "plan",
    "plan_tasks",
]


@dataclasses.dataclass(frozen=True)
class Device:
    """One place to run work: ``kind`` "cuda" or "cpu", its ``index``, and a relative ``weight`` > 0.

    Example:

    >>> from clisonix_gpu import alda
    >>> device = alda.Device("cuda", 1, weight=2.0)
    >>> device.name, device.to_dict()
    ('cuda:1', {'kind': 'cuda', 'index': 1, 'weight': 2.0})
    """

    kind: str
    index: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "cpu"):
            raise ValueError(f"device kind must be 'cuda' or 'cpu'; got {self.kind!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"device index must be an int >= 0; got {self.index!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"device weight must be a finite number > 0; got {self.weight!r} for {self.kind}:{self.index}")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "weight": float(self.weight)}


def parse_devices(spec: str) -> tuple[Device, ...]:
    """Devices from text such as ``"cuda:0=2,cuda:1"`` (weight after ``=``, default 1).

    Raises ``ValueError`` for malformed entries.

    Example:

    >>> from clisonix_gpu import alda
    >>> [(d.name, d.weight) for d in alda.parse_devices("cuda:0=2,cuda:1")]
    [('cuda:0', 2.0), ('cuda:1', 1.0)]
    """
    devices = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition("=")
        kind, _, index = name.partition(":")
        try:
            devices.append(Device(kind.strip(), int(index), float(weight) if weight else 1.0))
        except ValueError as exc:
            raise ValueError(f"bad device {item!r} in {spec!r} (expected kind:index[=weight]): {exc}") from None
    return tuple(devices)


def discover() -> tuple[Device, ...]:
    """The devices of this machine, in order: ``cuda:i`` by index, weighted by multiprocessor count
    times clock where torch reports it; with no GPU, ``cpu:0..n-1`` worker slots of weight 1.

    ``CLISONIX_DEVICES`` (same syntax as :func:`parse_devices`) overrides the discovery.

    Example:

    >>> from clisonix_gpu import alda
    >>> devices = alda.discover()
    >>> all(d.kind in ("cuda", "cpu") and d.weight > 0 for d in devices)
    True
    """
    override = os.environ.get("CLISONIX_DEVICES")
    if override:
        return parse_devices(override)
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    if count:
        devices = []
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            clock_ghz = getattr(props, "clock_rate", 0) / 1e6 or 1.0
            devices.append(Device("cuda", i, float(props.multi_processor_count * clock_ghz)))
        return tuple(devices)
    return tuple(Device("cpu", i) for i in range(os.cpu_count() or 1))


def _check_devices(devices: Sequence[Device]) -> tuple[Device, ...]:
    devices = tuple(devices)
    if not devices:
        raise ValueError("the device list is empty: pass at least one Device (see alda.discover())")
    for d in devices:
        if not isinstance(d, Device):
            raise TypeError(f"devices must be alda.Device; got {type(d).__name__}")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError(f"devices repeat: {names}")
    return devices


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    return value


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Shard:
    """Items ``[start, stop)`` run on ``device``.

    Example:

    >>> from clisonix_gpu import alda
    >>> first = alda.plan(10, alda.parse_devices("cpu:0=2,cpu:1"))[0]
    >>> first.device.name, first.start, first.stop, first.size
    ('cpu:0', 0, 7, 7)
    """

    device: Device
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An immutable sequence of :class:`Shard` covering ``range(n_items)`` in device order.

    Example:

    >>> from clisonix_gpu import alda
    >>> schedule = alda.plan(10, alda.parse_devices("cpu:0=2,cpu:1"))
    >>> [(shard.start, shard.stop) for shard in schedule]
    [(0, 7), (7, 10)]
    >>> alda.Schedule.from_json(schedule.to_json()) == schedule
    True
    """

    n_items: int
    align: int
    shards: tuple[Shard, ...]

    def __iter__(self) -> Iterator[Shard]:
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> Shard:
        return self.shards[i]

    def to_json(self) -> str:
        """Canonical JSON: the same schedule always gives the same bytes."""
        body = {
            "n_items": self.n_items,
            "align": self.align,
            "shards": [{"device": s.device.to_dict(), "start": s.start, "stop": s.stop} for s in self.shards],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Inverse of :meth:`to_json`."""
        body = json.loads(text)
        shards = tuple(Shard(Device(**s["device"]), s["start"], s["stop"]) for s in body["shards"])
        return cls(body["n_items"], body["align"], shards)

    def __str__(self) -> str:
        lines = [f"{'device':>8}  {'weight':>8}  {'start':>10}  {'stop':>10}  {'items':>10}"]
        for s in self.shards:
            lines.append(f"{s.device.name:>8}  {s.device.weight:>8g}  {s.start:>10}  {s.stop:>10}  {s.size:>10}")
        return "\n".join(lines)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` proportionally to ``weights``: floors, then one more to the largest exact
    remainders, ties to the lower position."""
    exact = [fractions.Fraction(w) for w in weights]
    whole = sum(exact)
    quotas = [total * w / whole for w in exact]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan(n_items: int, devices: Sequence[Device], *, align: int = 1) -> Schedule:
    """Contiguous shards of ``range(n_items)`` over ``devices`` in order, sized by weight.

    Every shard but the last is a multiple of ``align`` (the ``n_items % align`` leftover items go
    to the last shard); shards may be empty when items are fewer than devices. Pure and
    deterministic. Raises ``ValueError`` for an empty device list, ``n_items`` < 0 or ``align`` < 1.

    Example:

    >>> from clisonix_gpu import alda
    >>> schedule = alda.plan(1000, alda.parse_devices("cuda:0=2,cuda:1"), align=8)
    >>> [shard.size for shard in schedule]
    [664, 336]
    """
    devices = _check_devices(devices)
    _check_count("n_items", n_items, 0)
    _check_count("align", align, 1)
    units = _largest_remainder(n_items // align, [d.weight for d in devices])
    sizes = [u * align for u in units]
    sizes[-1] += n_items % align
    shards, start = [], 0
    for device, size in zip(devices, sizes):
        shards.append(Shard(device, start, start + size))
        start += size
    return Schedule(n_items, align, tuple(shards))


@dataclasses.dataclass(frozen=True)
class TaskSchedule:
    """Result of :func:`plan_tasks`: ``assignment[t]`` is the device position of task t,
    ``order`` the tasks in the order they were placed, ``loads`` the busy time per device.

    Example:

    >>> from clisonix_gpu import alda
    >>> schedule = alda.plan_tasks([5, 3, 3, 2, 2], alda.parse_devices("cpu:0,cpu:1"))
    >>> schedule.assignment, schedule.loads, schedule.makespan
    ((0, 1, 1, 0, 1), (7.0, 8.0), 8.0)
    >>> schedule.tasks_of(0)
    (0, 3)
    """

    devices: tuple[Device, ...]
    assignment: tuple[int, ...]
    order: tuple[int, ...]
    loads: tuple[float, ...]

    @property
    def makespan(self) -> float:
        return max(self.loads, default=0.0)

    def tasks_of(self, position: int) -> tuple[int, ...]:
        """Tasks of the device at ``position``, in the order they run."""
        return tuple(t for t in self.order if self.assignment[t] == position)


def plan_tasks(costs: Sequence[float], devices: Sequence[Device], priorities: Sequence[float] | None = None) -> TaskSchedule:
    """List scheduling: tasks by priority (higher first), then longest cost, then index; each to
    the device that would finish it earliest (cost / weight), ties to the lower device index.

    With equal weights and no priorities this is LPT. Raises ``ValueError`` for an empty device
    list, negative or non-finite costs, or priorities of the wrong length.

    Example:

    >>> from clisonix_gpu import alda
    >>> schedule = alda.plan_tasks([1, 4, 2], alda.parse_devices("cpu:0,cpu:1"), priorities=[1, 0, 0])
    >>> schedule.order, schedule.assignment  # task 0 first: it has the highest priority
    ((0, 1, 2), (0, 1, 0))
    """
    devices = _check_devices(devices)
    costs = [float(c) for c in costs]
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"task costs must be finite and >= 0; got {costs}")
    prio = [0.0] * len(costs) if priorities is None else [float(p) for p in priorities]
    if len(prio) != len(costs):
        raise ValueError(f"priorities has {len(prio)} entries for {len(costs)} tasks")
    order = sorted(range(len(costs)), key=lambda t: (-prio[t], -costs[t], t))
    loads = [0.0] * len(devices)
    assignment = [0] * len(costs)
    if len({d.weight for d in devices}) == 1:
        # equal weights: the earliest finish is the least load, ties to the lower index, which
        # is exactly what a heap of (load, position) pops
        weight = devices[0].weight
        heap = [(0.0, d) for d in range(len(devices))]
        for t in order:
            load, best = heapq.heappop(heap)
            assignment[t] = best
            loads[best] = load + costs[t] / weight
            heapq.heappush(heap, (loads[best], best))
    else:
        for t in order:
            best = min(range(len(devices)), key=lambda d: (loads[d] + costs[t] / devices[d].weight, d))
            assignment[t] = best
            loads[best] += costs[t] / devices[best].weight
    return TaskSchedule(devices, tuple(assignment), tuple(order), tuple(loads))


# ----------------------------------------------------------------------------- execution


class ShardError(RuntimeError):
    """A shard (or task) failed; the message names it and its device, the cause is chained.

    Example:

    >>> from clisonix_gpu import alda
    >>> manager = alda.DeviceManager(alda.parse_devices("cpu:0,cpu:1"))
    >>> manager.map(lambda x: x[10], np.arange(4.0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clisonix_gpu.alda.ShardError: ...
    """


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def _to_device(a: Any, device: Device) -> Any:
    """Torch tensors move to ``device``; everything else passes unchanged."""
    if not _is_torch(a):
        return a
    import torch

    return a.to(torch.device(device.kind, device.index) if device.kind == "cuda" else "cpu", non_blocking=True)


@contextlib.contextmanager
def _on(device: Device) -> Iterator[None]:
    """Run inside ``device``'s CUDA context on a stream of its own; nothing to do for CPU slots."""
    if device.kind != "cuda":
        yield
        return
    import torch

    with torch.cuda.device(device.index):
        stream = torch.cuda.Stream(device.index)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()


def _concatenate(parts: list[Any], like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.cat(parts, dim=0)
    if type(like).__module__.startswith("cupy"):
        import cupy

        return cupy.concatenate(parts, axis=0)
    import numpy as np

    return np.concatenate(parts, axis=0)


class DeviceManager:
    """Runs ops across devices by ALDA plans. ``devices`` defaults to :func:`discover`.

    Example:

    >>> from clisonix_gpu import alda
    >>> manager = alda.DeviceManager(alda.parse_devices("cpu:0,cpu:1"))
    >>> manager.map(np.square, np.arange(5.0)).tolist()  # rows 0-2 on cpu:0, 3-4 on cpu:1
    [0.0, 1.0, 4.0, 9.0, 16.0]
    >>> manager.run([lambda device: "a", lambda device: device.name], costs=[2.0, 1.0])
    ['a', 'cpu:1']
    """

    def __init__(self, devices: Sequence[Device] | None = None):
        self.devices = _check_devices(discover() if devices is None else devices)

    def __repr__(self) -> str:
        return f"DeviceManager({', '.join(d.name for d in self.devices)})"

    def _run_all(self, jobs: Sequence[tuple[str, Device, Callable[..., Any]]]) -> list[Any]:
        """Run jobs (one thread per device, jobs of a device in list order); all results or an error."""
        by_device: dict[str, list[int]] = {}
        for i, (_, device, _) in enumerate(jobs):
            by_device.setdefault(device.name, []).append(i)
        results: list[Any] = [None] * len(jobs)
        failed = threading.Event()  # after a failure, devices skip their remaining jobs

        def worker(indices: list[int]) -> None:
            for i in indices:
                if failed.is_set():
                    return
                label, device, job = jobs[i]
                with _on(device):
                    try:
                        results[i] = job()
                    except Exception as exc:
                        failed.set()
                        raise ShardError(f"{label} on {device.name} failed: {type(exc).__name__}: {exc}") from exc

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(by_device), 1)) as pool:
            futures = [pool.submit(worker, idx) for idx in by_device.values()]
            concurrent.futures.wait(futures)
        for f in futures:  # first failure in device order
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return results

    def map(self, op: Callable[..., Any], x: Any, *args: Any, align: int = 1, out_device: Device | None = None, **kw: Any) -> Any:
        """``op(x, *args, **kw)`` computed shard by shard on axis 0 and concatenated in order.

        Torch tensors in ``x`` and ``args`` move to each shard's device; the result lands on
        ``out_device`` (default: the first device). Raises :class:`ShardError` naming the shard
        and device if any shard fails; no partial result is returned.
        """
        schedule = plan(len(x), self.devices, align=align)
        jobs = []
        for shard in schedule:
            if shard.size == 0 and len(x) > 0:
                continue

            def job(s: Shard = shard) -> Any:
                local = [_to_device(a, s.device) for a in (x[s.start : s.stop], *args)]
                local_kw = {k: _to_device(v, s.device) for k, v in kw.items()}
                return op(*local, **local_kw)

            jobs.append((f"shard [{shard.start}, {shard.stop})", shard.device, job))
        parts = self._run_all(jobs)
        target = out_device or self.devices[0]
        return _concatenate([_to_device(p, target) for p in parts], parts[0])

    def run(
        self, tasks: Sequence[Callable[[Device], Any]], costs: Sequence[float] | None = None, priorities: Sequence[float] | None = None
    ) -> list[Any]:
        """Run ``task(device)`` for each task by a :func:`plan_tasks` schedule (unit costs by
        default); results come back in task order. Raises :class:`ShardError` naming the task."""
        costs = [1.0] * len(tasks) if costs is None else costs
        schedule = plan_tasks(costs, self.devices, priorities)
        jobs = []
        for t in schedule.order:
            device = self.devices[schedule.assignment[t]]
            jobs.append((f"task {t}", device, lambda t=t, d=device: tasks[t](d)))
        results = self._run_all(jobs)
        by_task = dict(zip(schedule.order, results))
        return [by_task[t] for t in range(len(tasks))]

    def map_distributed(self, op: Callable[..., Any], x: Any, *args: Any, group: Any = None, **kw: Any) -> Any:
        """One process per device under ``torch.distributed``: rank r computes shard r of the plan
        over this manager's devices (one device per rank), and every rank gets the whole result,
        all-gathered in order (uneven shards padded for the exchange, then trimmed).
        """
        import numpy as np
        import torch
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world != len(self.devices):
            raise ValueError(f"map_distributed needs one device per rank: {world} ranks, {len(self.devices)} devices")
        schedule = plan(len(x), self.devices)
        mine = schedule[rank]
        device = mine.device
        with _on(device):
            local = op(_to_device(x[mine.start : mine.stop], device), *(_to_device(a, device) for a in args), **kw)
        was_numpy = isinstance(local, np.ndarray)
        local_t = torch.from_numpy(np.ascontiguousarray(local)) if was_numpy else local.contiguous()
        longest = max(s.size for s in schedule)
        padded = local_t.new_zeros((longest,) + tuple(local_t.shape[1:]))
        padded[: mine.size] = local_t
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        result = torch.cat([g[: s.size] for g, s in zip(gathered, schedule)], dim=0)
        return result.numpy() if was_numpy else result

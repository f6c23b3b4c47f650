"""ALDA: plans and task schedules are deterministic and fair; execution is bit-identical for any
device count and fails cleanly."""

from __future__ import annotations

import datetime
import itertools
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import clisonix_gpu as cg
from clisonix_gpu import alda

weights = st.lists(st.floats(0.01, 100.0, allow_nan=False), min_size=1, max_size=6)


def _devices(ws):
    return tuple(alda.Device("cpu", i, w) for i, w in enumerate(ws))


# ----------------------------------------------------------------------------- plan


@given(n=st.integers(0, 10_000), ws=weights, align=st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_plan_covers_every_item_once_in_order_and_proportionally(n, ws, align):
    devices = _devices(ws)
    schedule = alda.plan(n, devices, align=align)
    assert len(schedule) == len(devices)
    assert [s.device for s in schedule] == list(devices)
    assert schedule[0].start == 0 and schedule[-1].stop == n
    for a, b in zip(schedule, schedule[1:]):
        assert a.stop == b.start
    units, leftover = divmod(n, align)
    total = sum(ws)
    for i, s in enumerate(schedule):
        assert s.size >= 0
        size = s.size - (leftover if i == len(devices) - 1 else 0)
        assert size % align == 0
        assert abs(size / align - units * ws[i] / total) < 1 + 1e-9  # within one unit of its quota
    assert schedule == alda.plan(n, devices, align=align)
    assert alda.Schedule.from_json(schedule.to_json()) == schedule
    assert alda.Schedule.from_json(schedule.to_json()).to_json() == schedule.to_json()


def test_plan_ties_go_to_the_lower_device_index():
    schedule = alda.plan(5, _devices([1, 1, 1]))
    assert [s.size for s in schedule] == [2, 2, 1]
    assert [s.size for s in alda.plan(2, _devices([1, 1, 1]))] == [1, 1, 0]


def test_plan_is_identical_across_processes():
    code = "from clisonix_gpu import alda;print(alda.plan(1_000_003, alda.parse_devices('cpu:0=1.7,cpu:1=0.3,cpu:2=2.9'), align=8).to_json())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    here = alda.plan(1_000_003, alda.parse_devices("cpu:0=1.7,cpu:1=0.3,cpu:2=2.9"), align=8).to_json()
    assert out.strip() == here


def test_schedule_prints_as_a_table():
    text = str(alda.plan(10, alda.parse_devices("cpu:0=2,cpu:1")))
    assert "cpu:0" in text and "cpu:1" in text and "items" in text


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: alda.plan(5, []), "empty"),
        (lambda: alda.plan(-1, _devices([1])), "n_items"),
        (lambda: alda.plan(5, _devices([1]), align=0), "align"),
        (lambda: alda.Device("cpu", 0, 0.0), "weight"),
        (lambda: alda.Device("cpu", 0, -2.0), "weight"),
        (lambda: alda.Device("tpu", 0), "kind"),
        (lambda: alda.parse_devices("cpu:x"), "cpu:x"),
        (lambda: alda.plan(5, [alda.Device("cpu", 0), alda.Device("cpu", 0)]), "repeat"),
        (lambda: alda.plan_tasks([1.0, -1.0], _devices([1])), "costs"),
        (lambda: alda.plan_tasks([1.0], _devices([1]), priorities=[1, 2]), "priorities"),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_discover_defaults_and_override(monkeypatch):
    monkeypatch.delenv("CLISONIX_DEVICES", raising=False)
    found = alda.discover()
    assert found and len({d.name for d in found}) == len(found)
    monkeypatch.setenv("CLISONIX_DEVICES", "cpu:0=3,cpu:1")
    assert alda.discover() == (alda.Device("cpu", 0, 3.0), alda.Device("cpu", 1, 1.0))


# ----------------------------------------------------------------------------- plan_tasks


def _optimal_makespan(costs, m):
    best = float("inf")
    for assignment in itertools.product(range(m), repeat=len(costs)):
        loads = [0.0] * m
        for c, d in zip(costs, assignment):
            loads[d] += c
        best = min(best, max(loads))
    return best


@given(costs=st.lists(st.integers(1, 20), min_size=1, max_size=7), m=st.integers(1, 3))
@settings(max_examples=150, deadline=None)
def test_plan_tasks_within_lpt_bound(costs, m):
    schedule = alda.plan_tasks(costs, _devices([1] * m))
    optimal = _optimal_makespan(costs, m)
    assert schedule.makespan <= (4 / 3 - 1 / (3 * m)) * optimal + 1e-9
    loads = [0.0] * m
    for t, d in enumerate(schedule.assignment):
        loads[d] += costs[t]
    assert tuple(loads) == schedule.loads
    assert schedule == alda.plan_tasks(costs, _devices([1] * m))


def test_plan_tasks_orders_by_priority_then_cost_then_index():
    schedule = alda.plan_tasks([1, 5, 5, 2], _devices([1, 1]), priorities=[9, 0, 0, 0])
    assert schedule.order == (0, 1, 2, 3)
    assert schedule.assignment == (0, 1, 0, 1)
    assert schedule.tasks_of(0) == (0, 2)


def test_plan_tasks_uses_weights():
    schedule = alda.plan_tasks([4, 4, 4], _devices([3, 1]))
    assert schedule.assignment.count(0) == 3  # 4/3 per task on the fast device beats 4 on the slow one


# ----------------------------------------------------------------------------- DeviceManager


def _slots(n):
    return tuple(alda.Device("cpu", i) for i in range(n))


@pytest.mark.parametrize("rows", [1, 7, 127, 129])
def test_map_is_bit_identical_for_any_slot_count(rng, rows):
    x = rng.standard_normal((rows, 37)).astype(np.float32)
    w = rng.standard_normal((11, 37)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    codes = np.packbits(rng.random((rows, 70)) < 0.5, axis=-1, bitorder="little")
    db = np.packbits(rng.random((13, 70)) < 0.5, axis=-1, bitorder="little")
    single = cg.transform_matrix(x, w, b, activation="gelu")
    for n in (1, 2, 3):
        manager = alda.DeviceManager(_slots(n))
        assert np.array_equal(manager.map(cg.transform_matrix, x, w, b, activation="gelu"), single)
        assert np.array_equal(manager.map(cg.hamming_distance, codes, db), cg.hamming_distance(codes, db))
        assert np.array_equal(manager.map(cg.binary_matmul, codes, db, 70), cg.binary_matmul(codes, db, 70))
        assert np.array_equal(manager.map(cg.pack_bits, x), cg.pack_bits(x))
        ref_d, ref_i = cg.hamming_topk(codes, db, 4)
        assert np.array_equal(manager.map(lambda q, d: cg.hamming_topk(q, d, 4)[0], codes, db), ref_d)
        assert np.array_equal(manager.map(lambda q, d: cg.hamming_topk(q, d, 4)[1], codes, db), ref_i)


def test_map_returns_torch_tensors_for_torch_input(rng):
    x = torch.from_numpy(rng.standard_normal((9, 5)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32))
    got = alda.DeviceManager(_slots(2)).map(cg.transform_matrix, x, w)
    assert isinstance(got, torch.Tensor) and torch.equal(got, cg.transform_matrix(x, w))


def test_map_on_empty_input(rng):
    x = np.zeros((0, 5), np.float32)
    got = alda.DeviceManager(_slots(3)).map(cg.transform_matrix, x, np.ones((2, 5), np.float32))
    assert got.shape == (0, 2)


def test_failing_shard_names_shard_and_device_and_cleans_up():
    def op(x):
        if x[0] >= 5:
            raise ArithmeticError("boom")
        return x * 2

    before = threading.active_count()
    with pytest.raises(alda.ShardError, match=r"shard \[5, 10\) on cpu:1.*boom") as info:
        alda.DeviceManager(_slots(2)).map(op, np.arange(10))
    assert isinstance(info.value.__cause__, ArithmeticError)
    assert threading.active_count() <= before


def test_run_returns_results_in_task_order():
    manager = alda.DeviceManager(_slots(3))
    results = manager.run([lambda d, i=i: (i, d.name) for i in range(7)], costs=[7, 1, 5, 3, 3, 2, 6])
    assert [r[0] for r in results] == list(range(7))
    schedule = alda.plan_tasks([7, 1, 5, 3, 3, 2, 6], manager.devices)
    assert [r[1] for r in results] == [manager.devices[schedule.assignment[i]].name for i in range(7)]


def test_run_propagates_task_errors():
    with pytest.raises(alda.ShardError, match="task 1"):
        alda.DeviceManager(_slots(2)).run([lambda d: 1, lambda d: 1 / 0])


# ----------------------------------------------------------------------------- map_distributed


def _distributed_worker(rank, world, seed, out_dir):
    import torch.distributed as dist

    # a file store: no port picked ahead of time, which another process could take meanwhile
    store = dist.FileStore(os.path.join(out_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((127, 33)).astype(np.float32)
        w = rng.standard_normal((9, 33)).astype(np.float32)
        manager = alda.DeviceManager(_slots(world))
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), manager.map_distributed(cg.transform_matrix, x, w, activation="tanh"))
    finally:
        dist.destroy_process_group()


def test_map_distributed_two_gloo_processes_equal_single_process(tmp_path, rng):
    seed = int(rng.integers(2**31))
    context = mp.start_processes(_distributed_worker, args=(2, seed, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = 180.0
    waited = 0.0
    while not context.join(timeout=5):
        waited += 5
        if waited > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("map_distributed did not finish within 180 s")
    r = np.random.default_rng(seed)
    x = r.standard_normal((127, 33)).astype(np.float32)
    w = r.standard_normal((9, 33)).astype(np.float32)
    single = cg.transform_matrix(x, w, activation="tanh")
    for rank in range(2):
        assert np.array_equal(np.load(tmp_path / f"rank{rank}.npy"), single)

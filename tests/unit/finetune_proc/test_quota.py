"""CPU quota levels: a level's share of cores as threads x duty cycle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.cpu_plan import cores_for, cpu_plan
from harli.finetune_proc.quota import CpuQuota, cpu_quota


@given(st.integers(1, 16), st.integers(1, 64), st.data())
def test_plan_gives_exactly_the_levels_share(levels: int, max_threads: int,
                                             data: st.DataObject) -> None:
    level = data.draw(st.integers(1, levels))
    plan = cpu_plan(level, levels, max_threads)
    assert 1 <= plan.threads <= max_threads
    assert 0 < plan.duty <= 1
    assert plan.threads * plan.duty == pytest.approx(max_threads * level / levels)
    # As few threads as carry the share: one thread fewer could not.
    assert (plan.threads - 1) < max_threads * level / levels + 1e-9


def test_two_cores_four_levels() -> None:
    plans = [cpu_plan(level, 4, 2) for level in range(1, 5)]
    assert [(p.threads, p.duty) for p in plans] == [(1, 0.5), (1, 1.0), (2, 0.75), (2, 1.0)]


def test_top_level_never_idles_and_lower_levels_idle_in_proportion() -> None:
    q = CpuQuota(levels=4, max_threads=2)
    assert q.idle_after(4, 0.2) == 0
    assert q.idle_after(1, 0.2) == pytest.approx(0.2)  # duty 0.5: as long idle as busy
    assert q.idle_after(3, 0.3) == pytest.approx(0.1)


def test_a_chunk_holds_chunk_tokens_per_thread_of_the_level() -> None:
    assert [CpuQuota(4, 2).chunk_scale(lv) for lv in (1, 2, 3, 4)] == [1, 1, 2, 2]


_OMP_PROBE = """
import ctypes, os, sys
from pathlib import Path
from harli.finetune_proc.quota import openmp_start_mask
from harli.cpu_plan import set_process_affinity
spill = frozenset({int(sys.argv[1])})
own = openmp_start_mask(spill) if sys.argv[2] == "widen" else frozenset(os.sched_getaffinity(0))
import torch
gomp = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
procs = gomp.omp_get_num_procs()
set_process_affinity(own)
print(procs, sorted(own), sorted(os.sched_getaffinity(0)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
@pytest.mark.parametrize("start", ["widen", "as is"])
def test_torch_loads_with_the_spill_cores_in_the_mask_and_the_process_then_narrows(
        start: str) -> None:
    """libgomp counts the cores once, when it loads; loaded on the finetune's own core alone,
    it spins only briefly at barriers (see openmp_start_mask)."""
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    argv = ["taskset", "-c", str(c1), sys.executable, "-c", _OMP_PROBE, str(c0), start]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert int(out[0]) == (2 if start == "widen" else 1)  # the cores libgomp sees at load
    assert out[1].strip() == f"[{c1}] [{c1}]"  # back on its own core either way


def test_the_finetune_entry_loads_torch_only_after_its_process_set_up() -> None:
    code = "import sys, harli.finetune_proc.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("level", [0, 5, -1])
def test_levels_outside_the_range_are_refused(level: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        cpu_plan(level, 4, 2)


def test_levels_spill_onto_decode_cores_only_when_their_own_do_not_suffice() -> None:
    own, decode = frozenset({1}), frozenset({0})
    assert cores_for(1, own, decode) == {1}
    assert cores_for(2, own, decode) == {0, 1}
    assert cores_for(3, frozenset({2, 3, 4}), decode) == {2, 3, 4}
    assert cores_for(1, frozenset(), decode) == {0}  # no core of its own: shares decode's


def test_cores_at_follows_the_level_and_the_quota_factory_splits_the_host() -> None:
    q = cpu_quota(4, 0, frozenset({0, 1}), frozenset({0}))
    assert (q.own_cores, q.spill_cores, q.max_threads) == ({1}, {0}, 2)
    assert [q.cores_at(lv) for lv in (1, 2, 3, 4)] == [{1}, {1}, {0, 1}, {0, 1}]
    assert CpuQuota(4, 2).cores_at(4) == frozenset()  # no pinning configured


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_fence_moves_every_thread_of_another_process_off_decode_cores_at_once() -> None:
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    q = cpu_quota(4, 2, frozenset({c0, c1}), frozenset({c0}))
    code = ("import threading, time, sys\n"
            "ts = [threading.Thread(target=time.sleep, args=(30,), daemon=True) "
            "for _ in range(3)]\n"
            "[t.start() for t in ts]\nprint('up', flush=True)\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) == 4
        assert not q.fence(proc.pid, 4, 3)  # 4 -> 3 keeps decode's core: nothing to move
        assert not q.fence(proc.pid, 2, 1)  # already on its own cores
        assert q.fence(proc.pid, 4, 2)
        assert all(os.sched_getaffinity(t) == {c1} for t in tids)
        assert q.fence(proc.pid, 4, 0)  # paused: its step in flight ends on its own cores
    finally:
        proc.kill()
        proc.wait()
    q.fence(proc.pid, 4, 1)  # a process that is gone: no error raised


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_follow_fence_narrows_the_thread_pool_to_the_fenced_mask_and_apply_widens_it_again(
        ) -> None:
    # In a child: torch's thread count and this thread's mask are process state.
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    code = f"""
import os, torch
from harli.finetune_proc.quota import CpuQuota
from harli.cpu_plan import set_process_affinity
q = CpuQuota(4, 2, frozenset({{{c1}}}), frozenset({{{c0}}}))
assert not q.follow_fence()  # nothing applied yet
q.apply(4)
assert torch.get_num_threads() == 2 and os.sched_getaffinity(0) == {{{c0}, {c1}}}
assert not q.follow_fence()  # unfenced: two threads, two cores
set_process_affinity(frozenset({{{c1}}}))  # the daemon's fence after a drop to level 2
assert q.follow_fence() and torch.get_num_threads() == 1
assert not q.follow_fence()  # followed once
q.apply(2)  # the drop's decision, read at the chunk's end: already in force
assert torch.get_num_threads() == 1 and os.sched_getaffinity(0) == {{{c1}}}
q.apply(4)  # the next rise
assert torch.get_num_threads() == 2 and os.sched_getaffinity(0) == {{{c0}, {c1}}}
q.apply(2)
assert torch.get_num_threads() == 1 and not q.follow_fence()  # one thread: nothing to narrow
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_level_that_only_idles_more_than_a_higher_one_is_dominated_by_it() -> None:
    # 2 cores, 4 levels: 1 = level 2's thread half idle, 3 = level 4's two threads a quarter.
    assert cpu_quota(4, 2, frozenset({0, 1}), frozenset({0})).dominated_by() == \
        [None, 2, None, 4, None]
    # One core (decode unpinned): every level is the one thread with a longer duty.
    assert cpu_quota(4, 1, frozenset({0}), frozenset()).dominated_by() == [None, 2, 3, 4, None]
    # 8 levels of 4 threads, 2 own cores and 2 of decode's: each thread count comes at two
    # duties, the longer one dominates; levels 5-8 (3-4 threads) spill, 1-4 do not.
    q = cpu_quota(8, 4, frozenset({0, 1, 2, 3}), frozenset({0, 1}))
    assert q.dominated_by() == [None, 2, None, 4, None, 6, None, 8, None]
    assert q.cores_at(4) == {2, 3} and q.cores_at(5) == {0, 1, 2, 3}


def test_the_levels_that_spill_onto_decodes_cores() -> None:
    # 2 cores, 4 levels, decode on core 0: levels 3 and 4 add a thread on it.
    assert cpu_quota(4, 2, frozenset({0, 1}), frozenset({0})).spills() == \
        [False, False, False, True, True]
    q = cpu_quota(8, 4, frozenset({0, 1, 2, 3}), frozenset({0, 1}))
    assert q.spills() == [False] * 5 + [True] * 4
    assert cpu_quota(4, 1, frozenset({0}), frozenset()).spills() == [False] * 5  # unpinned

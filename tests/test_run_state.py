"""The run state machine: the table of moves, what each state allows, and the memory manager following it."""

from __future__ import annotations

import pytest
import torch

from djinn_kernel.memory import MemoryManager, MiB
from djinn_kernel.run_state import ENDED, MOVES, IllegalMove, RunState, check_move


def test_the_table_allows_exactly_the_documented_moves():
    allowed = {(a, b) for a, targets in MOVES.items() for b in targets}
    assert allowed == {
        (RunState.RUNNING, RunState.PAUSED),
        (RunState.PAUSED, RunState.RUNNING),
        (RunState.RUNNING, RunState.FINISHED),
        (RunState.RUNNING, RunState.FAILED),
        (RunState.RUNNING, RunState.CANCELLED),
    }
    for a in RunState:
        for b in RunState:
            if (a, b) in allowed:
                check_move(a, b)
            else:
                with pytest.raises(IllegalMove, match=f"from {a.value} to {b.value}"):
                    check_move(a, b)


def test_only_a_running_run_pins_its_session_on_the_device():
    assert [s for s in RunState if not s.pageable] == [RunState.RUNNING]
    assert {s for s in RunState if s.ended} == ENDED


def test_the_memory_manager_derives_paging_from_the_state():
    memory = MemoryManager(torch.device("cpu"), 1 << 30, 1 * MiB, chunk_bytes=1 * MiB)
    kv = torch.ones(1024)
    memory.register(1, lambda: [kv])
    memory.admit(1, kv.nbytes)
    assert memory.page_out(1) is None, "a session whose run was just admitted is running: never paged"
    memory.on_run(1, RunState.PAUSED)
    assert memory.page_out(1).nbytes == kv.nbytes
    memory.page_in(1)
    memory.on_run(1, RunState.RUNNING)
    assert memory.page_out(1) is None
    memory.on_run(1, RunState.FINISHED)
    assert memory.session(1).reserved == 0 and memory.page_out(1).nbytes == kv.nbytes
    memory.page_in(1)
    assert torch.equal(kv, torch.ones(1024))

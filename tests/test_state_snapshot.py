"""Snapshot rows (engine/state_snapshot.py): a saved and restored slot is the same state, bit for bit, through
the device and the host tier, and continues exactly as the slot it was saved from, at every position class
of the Fenwick state and the token window (W = 32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fenwick_llm.engine.loader import load_model
from fenwick_llm.engine.model_state import ModelState
from fenwick_llm.engine.prefix_cache import StateCopy, Tier
from fenwick_llm.engine.state_snapshot import SnapshotBank, dead_runs, live_level_runs, state_stacks
from fenwick_llm.kernels.state import BW

SLOT, DEV, HOST = Tier.SLOT, Tier.DEVICE, Tier.HOST
# 0 (nothing to restore) aside: 1, 2^k - 1, 2^k, odd, inside a window block, at its end, one past it
POSITIONS = [1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 65, 100]


def slot_state(state: ModelState, slot: int) -> list[torch.Tensor]:
    return [t[:, slot].clone() for t in state_stacks(state)] + [state.positions[slot].clone()]


def assert_bitwise(x: torch.Tensor, y: torch.Tensor) -> None:
    """Equal bit for bit, NaN where the other is NaN (window rows past the position are never written)."""
    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def assert_same_slot(a: ModelState, i: int, b: ModelState, j: int) -> None:
    for x, y in zip(slot_state(a, i), slot_state(b, j), strict=True):
        assert_bitwise(x, y)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    m, _ = load_model(str(tiny_model_dir))
    return m


def make_pool(model, slots: int = 4) -> ModelState:
    state = ModelState.allocate(model.config, slots, num_levels=ModelState.levels_for(model.config, 256))
    assert state.all_window is not None and state.num_levels > BW + 1  # levels past the window too
    return state


def test_round_trip_through_both_tiers_is_bitwise(model) -> None:
    pool = make_pool(model)
    gen = torch.Generator().manual_seed(0)
    for t in state_stacks(pool):
        t.copy_(torch.randn(t.shape, generator=gen))
    pool.positions.copy_(torch.tensor([5, 77, 3, 9]))
    bank = SnapshotBank(pool, model.config, device_rows=2, host_rows=3)
    want = slot_state(pool, 1)
    bank.copy(pool, [StateCopy(SLOT, 1, DEV, 1), StateCopy(DEV, 1, SLOT, 2),  # device tier
                     StateCopy(DEV, 1, HOST, 2), StateCopy(SLOT, 0, DEV, 1),  # demoted, row reused
                     StateCopy(HOST, 2, SLOT, 3), StateCopy(SLOT, 1, HOST, 0)])  # host tier, direct save
    for slot in (2, 3):
        for x, y in zip(slot_state(pool, slot), want, strict=True):
            assert_bitwise(x, y)
    assert bank.rows is not None
    assert_same_slot(bank.rows, 1, pool, 0)
    bank.copy(pool, [StateCopy(HOST, 0, SLOT, 0)])
    assert_same_slot(pool, 0, pool, 1)
    assert bank.nbytes == 5 * pool.bytes_per_slot


def prefill(model, state: ModelState, ids: list[int], slot: int, start: int) -> torch.Tensor:
    return model.prefill(torch.tensor(ids), torch.tensor([0, len(ids)]), state, torch.tensor([slot]), [start])


def stored_values(state: ModelState, slot: int) -> torch.Tensor:
    """The stored levels' values S = block * exp(owed decay) (0 where the decay is -inf), in float64."""
    position = int(state.positions[slot])
    decay = state.all_decay[:, slot, position % 2, state.low_level:].double()  # (layers, L', H)
    w = torch.where(torch.isneginf(decay), 0.0, decay.exp())[..., None, None]
    return torch.where(w > 0, state.all_levels[:, slot].double() * w, 0.0)


def test_live_level_runs() -> None:
    # no window (low 0): level 0 once a token is in, level l >= 1 where bit l - 1 of t - 1 is set
    assert live_level_runs(0, 5, 0) == []
    assert live_level_runs(1, 5, 0) == [(0, 1)]
    assert live_level_runs(4, 5, 0) == [(0, 3)]  # t - 1 = 0b11: levels 0, 1, 2
    assert live_level_runs(5, 5, 0) == [(0, 1), (3, 4)]  # 0b100: levels 0 and 3
    assert live_level_runs(-1, 9, 6) == [(0, 3)]
    assert live_level_runs(33, 9, 6) == [(0, 1)]  # t - 1 = 32: bit 5, level 6 (index 0)
    assert live_level_runs(32, 9, 6) == []  # 31: bits 0..4, levels 1..5, all in the window
    assert live_level_runs(64, 9, 6) == [(0, 1)]  # 63: bits 0..5, level 6 past the window
    assert live_level_runs(225, 9, 6) == [(0, 3)]  # 224 = 0b11100000: levels 6, 7, 8
    assert dead_runs([(0, 1), (2, 4)], 6) == [(1, 2), (4, 6)] and dead_runs([], 3) == [(0, 3)]


@pytest.mark.parametrize("tier", [DEV, HOST], ids=["device", "host"])
@pytest.mark.parametrize("p", POSITIONS, ids=[f"p{p}" for p in POSITIONS])
def test_restored_slot_continues_exactly(model, p: int, tier: Tier) -> None:
    """Slot 0 absorbs p tokens (a prompt, then decode steps: half of them from p = 8, across merges into the
    levels past the window, which leave stale blocks behind) and is saved (its live levels);
    slot 1 (junk before) restores it: the same state values. Both then take the same prompt chunk and
    decode steps: equal bit for bit (same kernels, same shapes), and equal within tolerance to a slot
    that prefilled everything in one chunk."""
    gen = torch.Generator().manual_seed(p)
    ids = torch.randint(1, model.config.vocab_size, (p + 40,), generator=gen).tolist()
    pool = make_pool(model)
    for t in state_stacks(pool):
        t.fill_(float("nan"))
    pool.reset(torch.tensor([0, 2]))
    bank = SnapshotBank(pool, model.config, device_rows=1, host_rows=1 if tier is HOST else 0)
    steps = p // 2 if p >= 8 else p - 1
    prefill(model, pool, ids[:p - steps], 0, 0)
    for t in ids[p - steps:p]:
        model.decode(torch.tensor([t]), pool, torch.tensor([0]))
    save = [StateCopy(SLOT, 0, DEV, 0, p)] + ([StateCopy(DEV, 0, HOST, 0, p)] if tier is HOST else [])
    bank.copy(pool, save)
    bank.copy(pool, [StateCopy(tier, 0, SLOT, 1, p)])
    for x, y in zip(slot_state(pool, 0)[1:], slot_state(pool, 1)[1:], strict=True):
        assert_bitwise(x, y)
    assert_bitwise(stored_values(pool, 0), stored_values(pool, 1))
    cut = p + 27
    a = prefill(model, pool, ids[p:cut], 0, p)
    b = prefill(model, pool, ids[p:cut], 1, p)
    assert torch.equal(a, b)
    steps = []
    for t in ids[cut:cut + 5]:  # one slot per call: a GEMM's rows need not agree bit for bit across rows
        steps.append(model.decode(torch.tensor([t]), pool, torch.tensor([0])))
        assert torch.equal(steps[-1], model.decode(torch.tensor([t]), pool, torch.tensor([1])))
    assert_same_slot(pool, 0, pool, 1)
    full = prefill(model, pool, ids[:cut], 2, 0)
    torch.testing.assert_close(full, a, rtol=1e-4, atol=1e-4)
    after = [model.decode(torch.tensor([t]), pool, torch.tensor([2])) for t in ids[cut:cut + 5]]
    for x, y in zip(after, steps, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)

"""The low levels as a token window (kernels/window.py, the engine's token_window): the windowed
pool means the same levels S as the plain recurrence, and its steps (reference and PyTorch path) match
the reference on S, across block boundaries and high-level folds."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.kernels import naive
from fenwick_llm.kernels.window import (
    BW,
    W,
    fused_recurrent_step_window,
    fused_recurrent_step_window_ref,
    windowed_levels,
)
from test_kernels_torch import _inputs

F64 = torch.float64


def _windowed_pool(starts: list[int], xs, P: int, slots: torch.Tensor, L: int, dtype: torch.dtype):
    """Pool, level_decay and window holding each sequence after its first starts[i] tokens: the high
    levels stored unevenly (random owed log-decay), the window from the raw tokens of the last block;
    every other slot and row NaN. Returns (levels, decay, window, S [N, L, H, K, V] by the recurrence)."""
    q, k, v, g, lam = xs
    N, _, G, K = q.shape
    H, V = v.shape[-2:]
    S = torch.zeros(N, L, H, K, V, dtype=F64)
    for i, s in enumerate(starts):
        if s:
            _, st = naive.recurrent_log_linear_attn(*(x[i:i + 1, :s] for x in xs), output_final_state=True)
            S[i] = st.levels[0]
    gen = torch.Generator().manual_seed(99)
    a = -2 * torch.rand(N, L, H, generator=gen, dtype=F64)
    levels = torch.full((P, L - BW - 1, H, K, V), float("nan"), dtype=dtype)  # levels 0..BW: the window
    levels[slots] = (S * torch.exp(-a)[..., None, None])[:, BW + 1:].to(dtype)
    fdt = F64 if dtype == F64 else torch.float32  # log-decays: float32, float64 in the exact checks
    decay = torch.full((P, 2, L, H), float("nan"), dtype=fdt)
    pos = torch.tensor(starts)
    decay[slots, pos % 2] = a.to(fdt)
    win_k = torch.full((P, 2, W, G, K), float("nan"), dtype=dtype)
    win_v = torch.full((P, 2, W, H, V), float("nan"), dtype=dtype)
    win_g = torch.full((P, 2, W, H), float("nan"), dtype=fdt)
    for i, s in enumerate(starts):
        if s == 0:
            continue
        b = (s - 1) >> BW
        first = b << BW
        gc = torch.cat([torch.zeros(1, H, dtype=F64), g[i, first + 1:s].cumsum(0)])
        win_k[slots[i], b % 2, :s - first] = k[i, first:s].to(dtype)
        win_v[slots[i], b % 2, :s - first] = v[i, first:s].to(dtype)
        win_g[slots[i], b % 2, :s - first] = gc.to(fdt)
    return levels, decay, (win_k, win_v, win_g), S


STARTS = [0, 1, 5, 31, 32, 33, 63, 64, 95, 127, 130]


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", ["ref", "torch"])
def test_windowed_steps_match_the_recurrence(impl, dtype, tol):
    G, H, K, V, L, steps = 1, 2, 8, 4, 10, 40
    N, P = len(STARTS), len(STARTS) + 2
    xs = _inputs(N, max(STARTS) + steps, G, H, K, V, L, seed=1)
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(2))[:N]
    levels, decay, window, S = _windowed_pool(STARTS, xs, P, slots, L, dtype)
    pos = torch.tensor(STARTS)
    assert (windowed_levels(levels, decay, window, slots, pos, F64) - S).abs().max() < tol * S.abs().max()
    step = fused_recurrent_step_window_ref if impl == "ref" else fused_recurrent_step_window
    for i in range(steps):  # every sequence crosses at least one block boundary
        q, k, v, g, lam = (x[torch.arange(N), pos + i] for x in xs)
        o_ref = naive.fused_recurrent_step_ref(q, k, v, g, lam, S, torch.arange(N), pos + i)
        o = step(q, k, v, g, lam, levels, decay, window, slots, pos + i)
        assert (o.double() - o_ref).abs().max() < tol * o_ref.abs().max(), i
    got = windowed_levels(levels, decay, window, slots, pos + steps, F64)
    assert (got - S).abs().max() < tol * S.abs().max()
    others = torch.ones(P, dtype=torch.bool)
    others[slots] = False
    assert levels[others].isnan().all() and window[0][others].isnan().all()


def test_window_levels_ignore_rows_past_the_last_token():
    """Rows of a block not yet reached hold NaN in the pool above; a level read from the window must
    not see them (the test above would fail otherwise): here the same with junk that is finite."""
    G, H, K, V, L = 1, 1, 4, 4, 8
    xs = _inputs(1, 40, G, H, K, V, L, seed=3)
    slots = torch.tensor([0])
    levels, decay, window, S = _windowed_pool([37], xs, 1, slots, L, F64)
    window[0][0, 1, 5:] = 1e3
    window[1][0, 1, 5:] = 1e3
    assert (windowed_levels(levels, decay, window, slots, torch.tensor([37]), F64) - S).abs().max() < 1e-12


def test_engine_with_token_windows_matches_the_full_forward(tiny_model_dir):
    """The engine on a windowed pool (token_window=True; on the CPU the PyTorch paths): prompts in
    16-token chunks that continue mid-block, 40 new tokens across block boundaries, staggered arrivals
    and n = 2 forks: the same tokens as a pool of blocks only, and greedy equals a full forward."""
    from fenwick_llm.engine import LLM, SamplingParams
    from test_llm import GREEDY, assert_greedy
    kw = dict(max_num_seqs=6, max_model_len=160, max_num_batched_tokens=48, long_prefill_chunk=16)
    prompts = [[5], list(range(3, 43)), list(range(100, 170)), list(range(7, 40))]
    outs = {}
    for window in (False, True):
        llm = LLM(str(tiny_model_dir), token_window=window, **kw)
        assert (llm.engine.pool.state.all_window is not None) == window
        greedy = llm.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))
        forks = llm.generate(prompts[1], SamplingParams(max_tokens=36, n=2, temperature=0.8, seed=3))[0]
        outs[window] = ([o.outputs[0].token_ids for o in greedy], [c.token_ids for c in forks.outputs])
    assert outs[True] == outs[False]
    for out in greedy:
        assert_greedy(llm, out)


@pytest.mark.gpu
def test_engine_with_token_windows_on_cuda_matches_the_block_pool(tiny_model_dir):
    """The same on the GPU (Triton windowed step under CUDA graphs, the fused prefill writing windows),
    fp32 weights: the same greedy tokens as a pool of blocks only."""
    from fenwick_llm.engine import LLM, SamplingParams
    from test_llm import GREEDY
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=160, max_num_batched_tokens=48,
              long_prefill_chunk=16)
    prompts = [[5], list(range(3, 43)), list(range(100, 170)), list(range(7, 40))]
    outs = [[o.outputs[0].token_ids for o in LLM(str(tiny_model_dir), token_window=w, **kw).generate(
        prompts, SamplingParams(max_tokens=40, **GREEDY))] for w in (False, True)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("t", [1, 5, 31, 32, 37, 64, 96, 128, 130, 255, 256, 600])
def test_window_step_traffic_counts_what_the_step_touches(t):
    """kernels.window.window_step_traffic (the bench's byte count) against the windowed step: its reads
    are the live high levels and the rows the window holds at t; every other block and row is poisoned
    (NaN) and the output stays finite; the blocks that change are its writes."""
    from fenwick_llm.kernels.window import window_step_traffic
    G, H, K, V, L = 1, 2, 4, 4, 11
    xs = _inputs(1, t + 1, G, H, K, V, L, seed=t)
    slots = torch.tensor([1])
    levels, decay, (win_k, win_v, win_g), S = _windowed_pool([t], xs, 3, slots, L, F64)
    live = [lv for lv in range(BW + 1, L) if S[0, lv].abs().sum() > 0]
    held = t - (((t - 1) >> BW) << BW) if t else 0  # rows of the last token's block
    reads, writes, rows = window_step_traffic(t)
    assert reads == len(live) and rows == held
    for lv in range(BW + 1, L):  # the pool's block b is level BW + 1 + b
        if lv not in live:
            levels[1, lv - BW - 1] = float("nan")
    buf = ((t - 1) >> BW) % 2
    win_k[1, 1 - buf], win_v[1, 1 - buf], win_g[1, 1 - buf] = (float("nan"),) * 3
    win_k[1, buf, held:], win_v[1, buf, held:], win_g[1, buf, held:] = (float("nan"),) * 3
    before = levels.clone()
    q, k, v, g, lam = (x[:, t] for x in xs)
    o = fused_recurrent_step_window(q, k, v, g, lam, levels, decay, (win_k, win_v, win_g), slots,
                                    torch.tensor([t]))
    after = levels[1].nan_to_num(7.0)
    changed = [b for b in range(L - BW - 1) if not torch.equal(after[b], before[1, b].nan_to_num(7.0))]
    assert torch.isfinite(o).all() and len(changed) == writes, (changed, writes)


BENCH_SHAPE = dict(
    hidden_size=768, num_hidden_layers=24, head_dim=64, state_size=128, expand=2, vocab_size=32000
)


def test_windowed_slots_store_only_the_high_levels():
    """A windowed slot keeps levels 0..BW as its window's rows and no block for them: fewer bytes than a
    slot of blocks only (the bench model at max_model_len 640: checked against the layout's arithmetic)."""
    from fenwick_llm.engine.model_config import ModelConfig
    from fenwick_llm.engine.state import ModelState
    from fenwick_llm.engine.state_pool import state_bytes_per_slot

    c = ModelConfig.from_dict({"model_type": "log_linear_mamba2", **BENCH_SHAPE, "n_groups": 1})
    L = ModelState.levels_for(c, 640)
    windowed = ModelState.allocate(c, 2, "meta", torch.bfloat16, num_levels=L, token_window=True)
    assert windowed.num_levels == L and windowed.low_level == BW + 1
    assert windowed.levels[0].shape == (2, L - BW - 1, c.num_heads, c.state_size, c.head_dim)
    blocks = state_bytes_per_slot(c, torch.bfloat16, torch.float32, L, token_window=False)
    window = state_bytes_per_slot(c, torch.bfloat16, torch.float32, L, token_window=True)
    block = c.num_heads * c.state_size * c.head_dim * 4 * c.num_hidden_layers  # one level, every layer
    rows = 2 * W * (c.n_groups * c.state_size * 2 + c.num_heads * c.head_dim * 2 + c.num_heads * 4)
    assert blocks - window == (BW + 1) * block - rows * c.num_hidden_layers


def _triton_case() -> dict:
    """Interpreter run (TRITON_INTERPRET=1, in a subprocess): the Triton windowed step against the
    reference on S, over the same steps as above, fp32 pool and bf16 window rows."""
    from fenwick_llm.kernels.window_triton import window_step
    G, H, K, V, L, steps = 1, 2, 8, 4, 10, 36
    N, P = len(STARTS), len(STARTS) + 2
    xs = _inputs(N, max(STARTS) + steps, G, H, K, V, L, seed=1)
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(2))[:N]
    levels, decay, window, S = _windowed_pool(STARTS, xs, P, slots, L, torch.float32)
    pos = torch.tensor(STARTS)
    worst = 0.0
    for i in range(steps):
        q, k, v, g, lam = (x[torch.arange(N), pos + i] for x in xs)
        o_ref = naive.fused_recurrent_step_ref(q, k, v, g, lam, S, torch.arange(N), pos + i)
        o = window_step(q.float(), k.float(), v.float(), g.float(), lam.float(), levels, decay, window, slots,
                        pos + i)
        worst = max(worst, ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item())
    got = windowed_levels(levels, decay, window, slots, pos + steps, F64)
    others = torch.ones(P, dtype=torch.bool)
    others[slots] = False
    return {"o": worst, "state": ((got - S).abs().max() / S.abs().max()).item(),
            "untouched": bool(levels[others].isnan().all() and window[0][others].isnan().all())}


def test_triton_windowed_step_interpreted():
    from interpreted import run_interpreted
    r = run_interpreted(__file__, timeout=600)
    assert r["o"] < 1e-5 and r["state"] < 1e-5 and r["untouched"], r


if __name__ == "__main__":
    import json
    print(json.dumps(_triton_case()))

"""Sampler on random logits: greedy, filters, penalties, min_tokens, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.engine.request import Request, Sequence
from fenwick_llm.engine.sampler import Sampler
from fenwick_llm.engine.sampling_params import SamplingParams

V = 50


def seq(prompt: list[int] | None = None, out: list[int] | None = None, eos: int = 0,
        **kw: object) -> Sequence:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    req = Request("r", None, prompt or [1, 2, 3], params, max_tokens=params.max_tokens or 16,
                  eos_token_ids=frozenset({eos}))
    s = req.seqs[0]
    s.token_ids = list(out or [])
    return s


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax(logits: torch.Tensor) -> None:
    out = Sampler(torch.device("cpu")).sample(logits, [seq(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-4)],
                         ids=["top_k1", "top_p0", "min_p1", "cold"])
def test_degenerate_filters_are_greedy(logits: torch.Tensor, kw: dict) -> None:
    out = Sampler(torch.device("cpu")).sample(logits, [seq(**kw) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_samples_follow_the_tempered_filtered_distribution() -> None:
    row = torch.randn(V, generator=torch.Generator().manual_seed(1))
    n = 20000
    sampler = Sampler(torch.device("cpu"), seed=3)
    seqs = [seq(temperature=0.7, top_k=10) for _ in range(n)]
    toks = torch.tensor(sampler.sample(row.expand(n, V), seqs).token_ids)
    freq = torch.bincount(toks, minlength=V).float() / n
    kth = (row / 0.7).topk(10).values[-1]
    expect = torch.softmax((row / 0.7).masked_fill(row / 0.7 < kth, float("-inf")), -1)
    assert freq[expect == 0].sum() == 0
    assert (freq - expect).abs().max() < 0.02


def test_top_p_keeps_the_nucleus() -> None:
    row = torch.tensor([3.0, 2.0, 1.0] + [-5.0] * (V - 3))
    p = torch.softmax(row, -1)
    top_p = float(p[0] + p[1]) - 1e-4  # needs tokens 0 and 1, not 2
    toks = Sampler(torch.device("cpu")).sample(row.expand(4000, V), [seq(top_p=top_p)] * 4000).token_ids
    assert set(toks) == {0, 1}


def test_penalties_match_their_formulas(logits: torch.Tensor) -> None:
    s = seq(prompt=[5, 6], out=[7, 7, 8], repetition_penalty=1.3, presence_penalty=0.5,
            frequency_penalty=0.25, temperature=0.0)
    x = logits[:1].clone()
    ref = x.clone()
    for t in (5, 6, 7, 8):
        ref[0, t] = ref[0, t] / 1.3 if ref[0, t] > 0 else ref[0, t] * 1.3
    ref[0, 7] -= 0.5 + 2 * 0.25
    ref[0, 8] -= 0.5 + 0.25
    sampler = Sampler(torch.device("cpu"))
    sampler._apply_penalties(x, [s])
    torch.testing.assert_close(x, ref)


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    row = torch.full((1, V), -1.0)
    row[0, 0] = 10.0  # eos
    row[0, 9] = 9.0  # a stop token id
    row[0, 4] = 1.0
    sampler = Sampler(torch.device("cpu"))
    early = seq(out=[1], min_tokens=3, stop_token_ids=[9], temperature=0.0)
    late = seq(out=[1, 2, 3], min_tokens=3, stop_token_ids=[9], temperature=0.0)
    ignore = seq(out=[1], min_tokens=3, ignore_eos=True, temperature=0.0)
    assert sampler.sample(row.expand(3, V), [early, late, ignore]).token_ids == [4, 0, 0]


def test_seeded_rows_reproduce_regardless_of_batch(logits: torch.Tensor) -> None:
    def run(batch_pos: int, batch: int, steps: int = 5) -> list[int]:
        sampler = Sampler(torch.device("cpu"), seed=batch)
        mine = seq(seed=1234, temperature=1.0, top_p=0.9)
        others = [seq(temperature=1.0) for _ in range(batch - 1)]
        got = []
        for t in range(steps):
            rows = others[:batch_pos] + [mine] + others[batch_pos:]
            x = logits[t % 6].expand(batch, V).clone()
            x += torch.randn(batch, V) * torch.tensor([0.0 if r is mine else 1.0 for r in rows])[:, None]
            got.append(sampler.sample(x, rows).token_ids[batch_pos])
        return got

    alone = run(0, 1)
    assert run(3, 7) == alone and run(6, 7) == alone
    assert run(0, 1) == alone


def test_logprobs_are_log_softmax_of_raw_logits(logits: torch.Tensor) -> None:
    seqs = [seq(logprobs=3, temperature=0.8, repetition_penalty=1.5), seq(), seq(logprobs=0, temperature=0.0)]
    out = Sampler(torch.device("cpu")).sample(logits[:3], seqs)
    lp = torch.log_softmax(logits[:3].float(), -1)
    a, b, c = out.logprobs
    assert b is None and a is not None and c is not None
    assert a.sampled == pytest.approx(lp[0, out.token_ids[0]].item(), abs=1e-5)
    assert a.top_ids == lp[0].topk(3).indices.tolist()
    assert a.top_logprobs == pytest.approx(lp[0].topk(3).values.tolist(), abs=1e-5)
    assert c.top_ids == [] and c.sampled == pytest.approx(lp[2].max().item(), abs=1e-5)

"""Scheduler on the CPU with a fake runner whose 'state' is the list of tokens each slot has absorbed."""

from __future__ import annotations

import random

import pytest
from fenwick_llm.engine.errors import InvalidRequestError, QueueFullError
from fenwick_llm.engine.request import Request, RequestStatus
from fenwick_llm.engine.sampling_params import SamplingParams
from fenwick_llm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from fenwick_llm.engine.state_pool import SlotAllocator


class FakeRunner:
    """Absorbs tokens into per-slot lists; 'samples' a token that depends on the slot's history."""

    def __init__(self) -> None:
        self.state: dict[int, list[int]] = {}
        self.prompt_calls = 0

    def execute(self, out: SchedulerOutput) -> list[int]:
        for slot in out.reset_slots:
            self.state[slot] = []
        for c in out.chunks:
            if c.is_prompt:
                self.prompt_calls += 1
            self.state[c.seq.slot].extend(c.token_ids)
        for src, dsts in out.forks:
            for d in dsts:
                self.state[d] = list(self.state[src])
        return [(sum(self.state[s.slot]) * 31 + s.index) % 97 + 1 for s in out.sampled_seqs]


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, n: int = 1) -> Request:
    params = SamplingParams(max_tokens=max_tokens, n=n)
    return Request(rid, None, list(range(1, prompt_len + 1)), params, max_tokens=max_tokens)


def make_scheduler(slots: int = 4, budget: int = 16, chunk: int = 8, waiting: int = 100) -> Scheduler:
    return Scheduler(SchedulerConfig(slots, budget, chunk, waiting), SlotAllocator(slots))


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    """One engine step: schedule, run, append the sampled tokens, finish at max_tokens, free slots."""
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    for c in out.chunks:  # every decode continues from exactly the sequence's history
        if not c.is_prompt:
            seq = c.seq
            assert runner.state[seq.slot] == seq.request.prompt_token_ids + seq.token_ids[:-1]
    for seq, tok in zip(out.sampled_seqs, runner.execute(out), strict=True):
        seq.token_ids.append(tok)
        if len(seq.token_ids) >= seq.request.max_tokens:
            seq.finish_reason = "length"
    for req in {id(s.request): s.request for s in out.sampled_seqs}.values():
        sched.free_finished(req)
    return out


def test_decodes_first_then_prompt_chunks_share_the_budget() -> None:
    sched, runner = make_scheduler(slots=4, budget=8, chunk=8), FakeRunner()
    for i in range(3):
        sched.add(make_request(f"r{i}", 2, max_tokens=10))
    step(sched, runner)  # all three prompts (6 tokens) fit
    sched.add(make_request("long", 20, max_tokens=2))
    out = step(sched, runner)
    assert [len(c.token_ids) for c in out.chunks] == [1, 1, 1, 5]
    assert [c.is_prompt for c in out.chunks] == [False, False, False, True]
    assert out.num_decode_tokens == 3 and out.num_prompt_tokens == 5


def test_long_prompt_is_chunked_and_sampled_once() -> None:
    sched, runner = make_scheduler(slots=2, budget=64, chunk=4), FakeRunner()
    req = make_request("a", 10, max_tokens=3)
    sched.add(req)
    sizes = []
    while req.status is not RequestStatus.DECODE:
        out = step(sched, runner)
        sizes.append([(len(c.token_ids), c.sample) for c in out.chunks])
    assert sizes == [[(4, False)], [(4, False)], [(2, True)]]
    while sched.has_unfinished():
        step(sched, runner)
    assert len(req.seqs[0].token_ids) == 3 and sched.slots.num_free == 2


def test_queue_bound_and_n_too_large() -> None:
    sched, runner = make_scheduler(slots=2, waiting=2), FakeRunner()
    for rid in "abcd":  # two for the free slots, two to wait
        sched.add(make_request(rid, 3, max_tokens=20))
    with pytest.raises(QueueFullError):
        sched.add(make_request("e", 3))
    step(sched, runner)  # a and b take the slots: c and d wait, the queue is full
    with pytest.raises(QueueFullError):
        sched.add(make_request("f", 3))
    with pytest.raises(InvalidRequestError):
        make_scheduler(slots=2).add(make_request("d", 3, n=3))


def test_waits_for_slots_and_abort_frees_them_at_once() -> None:
    sched, runner = make_scheduler(slots=2), FakeRunner()
    sched.add(make_request("a", 3, max_tokens=50))
    sched.add(make_request("b", 3, max_tokens=50))
    sched.add(make_request("c", 3, max_tokens=50))
    step(sched, runner)
    assert sched.num_running == 2 and sched.num_waiting == 1 and sched.slots.num_free == 0
    aborted = sched.abort("a")
    assert aborted is not None and aborted.seqs[0].finish_reason == "abort"
    assert sched.slots.num_free == 1 and sched.num_running == 1
    step(sched, runner)
    assert sched.num_waiting == 0 and sched.num_running == 2
    assert sched.abort("c") is not None and sched.abort("c") is None and sched.abort("zzz") is None


def test_fork_after_last_prompt_chunk() -> None:
    sched, runner = make_scheduler(slots=4, chunk=4), FakeRunner()
    req = make_request("a", 6, max_tokens=3, n=3)
    sched.add(req)
    step(sched, runner)
    out = step(sched, runner)
    assert out.forks == [(req.seqs[0].slot, [req.seqs[1].slot, req.seqs[2].slot])]
    assert out.sampled_seqs == req.seqs
    assert runner.prompt_calls == 2  # the prompt ran once, in two chunks, for all three samples
    while sched.has_unfinished():
        step(sched, runner)
    assert [len(s.token_ids) for s in req.seqs] == [3, 3, 3]
    assert len({tuple(s.token_ids) for s in req.seqs}) == 3  # independent continuations


def test_n_needs_all_its_slots_before_admission() -> None:
    sched, runner = make_scheduler(slots=3), FakeRunner()
    sched.add(make_request("a", 2, max_tokens=5))
    sched.add(make_request("b", 2, max_tokens=5, n=3))
    sched.add(make_request("c", 2, max_tokens=5))
    step(sched, runner)
    assert list(sched.running) == ["a", "c"]  # b waits for 3 slots; c, which fits, passes it
    while sched.has_unfinished():
        step(sched, runner)
    assert sched.slots.num_free == 3


def test_a_large_request_blocks_small_ones_only_for_a_while() -> None:
    """Small requests pass a large one that does not fit, but at most max_bypass of them: then the
    slots that free up are kept for it, and it runs while small requests keep coming."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, long_prefill_chunk=8,
                                      max_waiting=100, max_bypass=3), SlotAllocator(4))
    runner = FakeRunner()
    sched.add(make_request("s0", 2, max_tokens=6))
    step(sched, runner)
    sched.add(make_request("big", 2, max_tokens=3, n=4))
    order: list[str] = []
    for i in range(1, 40):
        sched.add(make_request(f"s{i}", 2, max_tokens=6))
        step(sched, runner)
        order += [rid for rid in sched.running if rid not in order]
        if "big" in order:
            break
    assert "big" in order, "the large request starved"
    passed = order[order.index("s0") + 1:order.index("big")]
    assert 1 <= len(passed) <= 3, order  # small ones went first, but no more than max_bypass


def test_random_traffic_with_aborts_leaves_every_slot_free() -> None:
    rng = random.Random(0)
    sched, runner = make_scheduler(slots=6, budget=24, chunk=7, waiting=1000), FakeRunner()
    live: list[str] = []
    for i in range(200):
        n = rng.choice([1, 1, 2])
        req = make_request(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12), n=n)
        sched.add(req)
        live.append(req.request_id)
        if rng.random() < 0.5:
            step(sched, runner)
        if rng.random() < 0.2:
            sched.abort(live.pop(rng.randrange(len(live))))
    steps = 0
    while sched.has_unfinished():
        step(sched, runner)
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(list(sched.running)))
        steps += 1
        assert steps < 10_000
    assert sched.slots.num_free == 6 and sched.num_running_seqs == 0 and not sched.running

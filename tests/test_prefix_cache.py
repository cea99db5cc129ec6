"""The prefix cache's bookkeeping on the CPU, without tensors: the radix tree, rows and eviction, and the
scheduler with a fake runner whose slot and snapshot 'states' are the lists of tokens they absorbed."""

from __future__ import annotations

import random

import pytest
from fenwick_llm.engine.prefix_cache import (
    BRANCH_MIN_TOKENS,
    PrefixCache,
    PrefixCacheConfig,
    SnapshotOps,
    StateCopy,
    Tier,
)
from fenwick_llm.engine.radix_tree import RadixTree, common_prefix_len
from fenwick_llm.engine.request import Request
from fenwick_llm.engine.sampling_params import SamplingParams
from fenwick_llm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from fenwick_llm.engine.state_pool import SlotAllocator

# ---- radix tree ------------------------------------------------------------------------------------


def test_common_prefix_len() -> None:
    a = list(range(100))
    assert common_prefix_len(a, 0, a, 100) == 100
    assert common_prefix_len(a, 10, a[10:37] + [-1], 100) == 27
    assert common_prefix_len(a, 10, a[10:], 20) == 10  # stops at the limit
    assert common_prefix_len(a, 0, [5], 100) == 0 and common_prefix_len(a, 0, a, 0) == 0


def test_tree_insert_split_match_and_prune() -> None:
    tree: RadixTree[str] = RadixTree()
    abc = tree.insert([1, 2, 3, 4, 5, 6])
    abc.value = "long"
    mid = tree.insert([1, 2, 3])  # splits the edge: the deeper node keeps its value
    assert mid.depth == 3 and mid.value is None and abc.depth == 6 and abc.parent is mid
    mid.value = "mid"
    other = tree.insert([1, 2, 3, 9, 9])
    other.value = "other"
    assert tree.num_nodes == 4
    assert tree.find([1, 2, 3]) is mid and tree.find([1, 2]) is None and tree.find([1, 2, 3, 4]) is None
    path, node = tree.match([1, 2, 3, 4, 5, 6, 7], 7)
    assert path == 6 and node is abc
    path, node = tree.match([1, 2, 3, 4, 5, 6, 7], 5)  # deepest value within the limit
    assert path == 5 and node is mid
    path, node = tree.match([1, 2, 3, 9, 8], 5)  # leaves the tree inside an edge
    assert path == 4 and node is mid
    path, node = tree.match([1, 2, 3, 4, 5, 6], 6, usable=lambda v: v != "long")
    assert node is mid
    assert tree.match([7, 1], 2) == (0, None)
    tree.remove(mid)  # an inner node: it stays (two children) without its value
    assert tree.find([1, 2, 3]) is mid and mid.value is None and tree.num_nodes == 4
    tree.remove(other)  # prunes the leaf, then merges [1, 2, 3] into its one child
    assert tree.num_nodes == 2 and abc.key == [1, 2, 3, 4, 5, 6] and abc.parent is tree.root
    assert tree.match([1, 2, 3, 4, 5, 6], 6) == (6, abc)
    tree.remove(abc)
    assert tree.num_nodes == 1 and not tree.root.children


def test_tree_random_against_a_dict() -> None:
    rng = random.Random(0)
    tree: RadixTree[int] = RadixTree()
    kept: dict[tuple[int, ...], int] = {}
    for i in range(400):
        if kept and rng.random() < 0.3:
            key = rng.choice(sorted(kept))
            node = tree.find(list(key))
            assert node is not None and node.value == kept.pop(key)
            tree.remove(node)
            continue
        key = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 12)))
        tree.insert(list(key)).value = i
        kept[key] = i
        probe = [rng.randrange(3) for _ in range(14)]
        want = max((len(k) for k in kept if list(k) == probe[:len(k)]), default=0)
        _, node = tree.match(probe, 14)
        assert (0 if node is None else node.depth) == want
    for key, value in kept.items():
        node = tree.find(list(key))
        assert node is not None and node.value == value


# ---- rows, locks and eviction ---------------------------------------------------------------------


def request(rid: str, prompt: list[int], max_tokens: int = 4, n: int = 1) -> Request:
    params = SamplingParams(max_tokens=max_tokens, n=n)
    return Request(rid, None, list(prompt), params, max_tokens=max_tokens)


def finish(cache: PrefixCache, req: Request, slot: int, output: list[int]) -> None:
    seq = req.seqs[0]
    seq.slot, seq.token_ids, seq.finish_reason = slot, list(output), "length"
    cache.sequence_finished(seq, fed_last=False)


def test_restore_takes_the_deepest_ready_snapshot_and_locks_it() -> None:
    cache = PrefixCache(PrefixCacheConfig(device_rows=2, host_rows=0, row_bytes=100, interval=0))
    first = request("a", list(range(10)))
    finish(cache, first, slot=3, output=[10, 11, 12])  # absorbed 0..11: saved before the next resets
    ops = cache.take_ops()
    assert ops.before == [StateCopy(Tier.SLOT, 3, Tier.DEVICE, 0, 12)] and not ops.after
    nxt = request("b", list(range(14)))
    assert cache.restore(nxt, slot=0) == 12
    assert cache.take_ops().restores == [StateCopy(Tier.DEVICE, 0, Tier.SLOT, 0, 12)]
    assert cache.restore(request("c", list(range(12))), slot=1) == 0  # needs len - 1 = 11 tokens at most
    stats = cache.take_stats()
    assert (stats.queries, stats.hits, stats.device_bytes, stats.host_bytes) == (26, 12, 100, 0)
    finish(cache, request("d", [7, 7]), slot=2, output=[1, 2])  # the free row
    finish(cache, request("e", [8, 8]), slot=2, output=[1, 2])  # evicts "d": "a" is being restored
    assert cache.take_ops().before == [StateCopy(Tier.SLOT, 2, Tier.DEVICE, 1, 3)] * 2
    assert cache.tree.find([7, 7, 1]) is None and cache.tree.find(list(range(12))) is not None
    cache.begin_step()  # the restore is queued: "a" is unlocked, and the least recently used
    finish(cache, request("f", [9, 9]), slot=2, output=[1, 2])
    assert cache.take_ops().before == [StateCopy(Tier.SLOT, 2, Tier.DEVICE, 0, 3)]
    assert cache.tree.find(list(range(12))) is None and cache.tree.find([8, 8, 1]) is not None


def test_saves_after_the_model_are_matched_from_the_next_step() -> None:
    cache = PrefixCache(PrefixCacheConfig(device_rows=4, host_rows=0, row_bytes=1, interval=8))
    req = request("a", list(range(20)))
    assert [cache.next_point(req, start) for start in (0, 5, 8, 16)] == [8, 8, 16, 20]
    cache.prompt_chunk_done(req, 5, slot=0)  # not a snapshot point
    cache.prompt_chunk_done(req, 8, slot=0)
    assert cache.take_ops().after == [StateCopy(Tier.SLOT, 0, Tier.DEVICE, 0, 8)]
    assert cache.restore(request("b", list(range(12))), slot=1) == 0  # its copy runs after this step's model
    cache.begin_step()
    assert cache.restore(request("c", list(range(12))), slot=1) == 8
    cache.prompt_chunk_done(req, 20, slot=0)  # the prompt's end
    cache.prompt_chunk_done(req, 20, slot=0)  # the same tokens again: kept once
    assert len(cache.take_ops().after) == 1 and cache.num_rows(Tier.DEVICE) == 2


def test_eviction_demotes_to_host_then_drops_least_recent() -> None:
    cache = PrefixCache(PrefixCacheConfig(device_rows=2, host_rows=2, row_bytes=10, interval=0))
    assert cache.low_water == 1
    for i in range(3):  # the third save finds no free device row: the oldest snapshot goes to the host
        finish(cache, request(f"r{i}", [i, i, i]), slot=i, output=[5, 6])
    assert cache.take_ops().before == [
        StateCopy(Tier.SLOT, 0, Tier.DEVICE, 0, 4), StateCopy(Tier.SLOT, 1, Tier.DEVICE, 1, 4),
        StateCopy(Tier.DEVICE, 0, Tier.HOST, 0, 4), StateCopy(Tier.SLOT, 2, Tier.DEVICE, 0, 4)]
    cache.begin_step()  # a step keeps a device row free by demoting ahead
    assert cache.take_ops().before == [StateCopy(Tier.DEVICE, 1, Tier.HOST, 1, 4)]
    assert cache.restore(request("x", [0, 0, 0, 5, 9]), slot=7) == 4  # from the host tier
    assert cache.take_ops().restores == [StateCopy(Tier.HOST, 0, Tier.SLOT, 7, 4)]
    finish(cache, request("r3", [3, 3, 3]), slot=3, output=[5, 6])
    cache.begin_step()  # host rows full: its least recent is dropped (r1; r0 was restored since)
    assert cache.take_ops().before == [StateCopy(Tier.SLOT, 3, Tier.DEVICE, 1, 4),
                                       StateCopy(Tier.DEVICE, 0, Tier.HOST, 1, 4)]
    assert cache.tree.find([1, 1, 1, 5]) is None and cache.tree.find([0, 0, 0, 5]) is not None
    stats = cache.take_stats()
    assert stats.device_bytes == 10 and stats.host_bytes == 20


def test_branch_point_gets_a_snapshot() -> None:
    cache = PrefixCache(PrefixCacheConfig(device_rows=8, host_rows=0, row_bytes=1, interval=0))
    shared = list(range(100, 100 + BRANCH_MIN_TOKENS + 10))
    finish(cache, request("a", shared + [1, 2, 3]), slot=0, output=[4, 4])
    cache.begin_step()
    b = request("b", shared + [7, 8, 9])
    assert cache.restore(b, slot=1) == 0  # diverges where nothing is saved
    assert cache.next_point(b, 0) == len(shared)
    cache.prompt_chunk_done(b, len(shared), slot=1)
    assert cache.take_ops().after == [StateCopy(Tier.SLOT, 1, Tier.DEVICE, 1, len(shared))]
    cache.begin_step()
    assert cache.restore(request("c", shared + [5, 5]), slot=2) == len(shared)
    short = request("d", shared[:BRANCH_MIN_TOKENS - 1] + [0, 0])  # too close to the root to be worth a row
    assert cache.restore(short, slot=3) == 0 and cache.next_point(short, 0) == short.num_prompt_tokens


# ---- the scheduler with a fake runner ------------------------------------------------------------


class FakeRunner:
    """Slots and snapshot rows hold the tokens they absorbed; 'sampling' depends on the whole slot."""

    def __init__(self) -> None:
        self.state: dict[tuple[Tier, int], list[int]] = {}
        self.prompt_tokens = 0

    def copy(self, copies: list[StateCopy]) -> None:
        for c in copies:
            self.state[(c.dst, c.dst_index)] = list(self.state[(c.src, c.src_index)])

    def execute(self, out: SchedulerOutput) -> list[int]:
        self.copy(out.snapshots.before)
        for slot in out.reset_slots:
            self.state[(Tier.SLOT, slot)] = []
        self.copy(out.snapshots.restores)
        for c in out.chunks:
            if c.is_prompt:
                self.prompt_tokens += len(c.token_ids)
            self.state[(Tier.SLOT, c.seq.slot)].extend(c.token_ids)
        for src, dsts in out.forks:
            self.copy([StateCopy(Tier.SLOT, src, Tier.SLOT, d) for d in dsts])
        self.copy(out.snapshots.after)
        return [hash((tuple(self.state[(Tier.SLOT, s.slot)]), s.index)) % 97 + 1 for s in out.sampled_seqs]


def run_all(sched: Scheduler, runner: FakeRunner, requests: list[Request], stagger: int) -> None:
    pending = list(requests)
    while pending or sched.has_unfinished():
        for _ in range(stagger):
            if pending:
                sched.add(pending.pop(0))
        out = sched.schedule()
        for c in out.chunks:
            if not c.is_prompt:  # every decode continues from exactly the sequence's history
                seq = c.seq
                history = seq.request.prompt_token_ids + seq.token_ids[:-1]
                assert runner.state[(Tier.SLOT, seq.slot)] == history
        seqs = out.sampled_seqs
        for seq, tok in zip(seqs, runner.execute(out), strict=True):
            seq.token_ids.append(tok)
            if len(seq.token_ids) >= seq.request.max_tokens:
                seq.finish_reason = "length"
        for req in {id(s.request): s.request for s in seqs}.values():
            sched.free_finished(req)
    if sched.prefix_cache is not None:  # the last saves, as the next step would run them
        runner.copy(sched.prefix_cache.take_ops().before)


def workload(seed: int) -> list[Request]:
    """Conversations that resend their history, requests sharing system prompts, and unrelated ones."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 50) for _ in range(rng.randrange(30, 70))] for _ in range(2)]
    reqs = []
    for i in range(24):
        prompt = rng.choice(systems) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        if i % 3 == 0:
            prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(2, 40))]
        reqs.append(request(f"r{i}", prompt, max_tokens=rng.randrange(1, 6), n=1 + (i % 5 == 0)))
    return reqs


@pytest.mark.parametrize("rows", [(256, 0), (3, 0), (2, 3), (0, 2)],
                         ids=["roomy", "evicting", "host", "host-only"])
def test_scheduler_with_cache_equals_scheduler_without(rows: tuple[int, int]) -> None:
    """Same sampled tokens with and without the cache (the fake's samples hash the slot's whole history),
    second turns of conversations restore their first turn, and fewer prompt tokens run."""
    results = []
    for cached in (False, True):
        cache = PrefixCache(PrefixCacheConfig(*rows, row_bytes=1, interval=16)) if cached else None
        sched = Scheduler(SchedulerConfig(4, 24, 8, 100), SlotAllocator(4), cache)
        runner = FakeRunner()
        first = workload(0)
        run_all(sched, runner, first, stagger=2)
        turns = [request(f"t{r.request_id}", r.prompt_token_ids + r.seqs[0].token_ids + [3, 1], max_tokens=2)
                 for r in first]
        run_all(sched, runner, turns, stagger=3)
        results.append(([s.token_ids for r in first + turns for s in r.seqs], runner.prompt_tokens,
                        [r.num_cached_tokens for r in turns]))
        resumes = [len(r.prompt_token_ids) + len(r.seqs[0].token_ids) - 1 for r in first]
        if cache is not None:
            assert all(not s.locks for lru in cache.lru.values() for s in lru)
            used = sum(cache.num_rows(t) for t in (Tier.DEVICE, Tier.HOST))
            assert used <= rows[0] + rows[1] and cache.tree.num_nodes <= 2 * used + 1
    (plain, plain_tokens, none), (cached, cached_tokens, hits) = results
    assert plain == cached and not any(none)
    assert cached_tokens < plain_tokens
    if rows[0] >= 256:  # nothing evicted: every second turn resumes where its first turn stopped
        assert hits == resumes


def test_chunks_end_at_snapshot_points_and_restored_slots_are_not_reset() -> None:
    cache = PrefixCache(PrefixCacheConfig(8, 0, row_bytes=1, interval=16))
    sched = Scheduler(SchedulerConfig(2, 64, 12, 10), SlotAllocator(2), cache)
    runner = FakeRunner()
    req = request("a", list(range(1, 41)), max_tokens=1)
    run_all(sched, runner, [req], stagger=1)
    nxt = request("b", list(range(1, 41)) + [9, 9], max_tokens=1)
    sched.add(nxt)
    out = sched.schedule()
    assert out.reset_slots == [] and out.snapshots.restores == [StateCopy(Tier.DEVICE, 2, Tier.SLOT, 0, 40)]
    assert [len(c.token_ids) for c in out.chunks] == [2] and nxt.num_cached_tokens == 40
    assert isinstance(out.snapshots, SnapshotOps)

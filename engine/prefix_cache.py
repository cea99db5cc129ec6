"""Prefix cache bookkeeping (DESIGN §5 "State reuse"): which token prefixes have a saved state, and where.
No tensors: the scheduler asks it what to save and restore, the runner copies (engine/state_snapshot.py).

A request's state after t tokens (Fenwick levels with their owed decay, conv state, token window, position)
is an exact summary of those t tokens. Snapshots of slots (their live levels and everything else, see
engine/state_snapshot.py) live in rows of a device tier and a host tier, indexed by the tokens they
absorbed in a radix tree. A new request restores the deepest snapshot on its
prompt's path, at most len(prompt) - 1 tokens deep (the last prompt token must run for its logits), into its
slot, and prefills only the rest.

Snapshots are taken
- when a sequence finishes (not when aborted or failed), keyed by prompt + output without the last token,
  which was never fed back (with overlap decoding it was: then with it): where the next turn of a
  conversation resumes if the chat template renders the assistant turn as those tokens;
- at prompt chunk ends: every ``interval`` tokens, at the prompt's end (where the next turn resumes when the
  reply re-tokenizes differently), and at the branch point where the prompt leaves a cached path, when that is
  at least BRANCH_MIN_TOKENS past the restored state (later requests with that prefix restore there).
The scheduler cuts prompt chunks at these points (``next_point``).

Copies run at three points of a step (``SnapshotOps``): ``before`` the step's slot resets (saves of slots
freed since the last step, and demotions to the host tier), ``restores`` after the resets, ``after`` the
model runs (saves of prompt chunk ends). A snapshot is matched from the first step whose restores run after
its save. Eviction is least recently used over fixed-size rows (one slot's bytes each): a device row is
demoted to a host row, a host row is dropped; a snapshot being restored this step, or whose save has not
run, is never evicted. With a host tier, each step keeps a few device rows free by demoting ahead, and a
row freed so is reused last: its copy to the host runs beside the model, and is done long before a save
overwrites the row (the device waits for it otherwise).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .radix_tree import Node, RadixTree
from .request import Request, Sequence

BRANCH_MIN_TOKENS = 32  # a branch point this far past the restored state gets a snapshot (saves a prefill)


class Tier(enum.IntEnum):
    SLOT = 0  # a state pool slot (a running request's state)
    DEVICE = 1  # a snapshot row in device memory
    HOST = 2  # a snapshot row in (pinned) host memory


@dataclass(frozen=True)
class StateCopy:
    """Copy one slot state from one place to another (slot, device row or host row)."""

    src: Tier
    src_index: int
    dst: Tier
    dst_index: int
    position: int = -1  # tokens the state absorbed: only its live levels move (-1: every level)


@dataclass
class SnapshotOps:
    """A step's snapshot copies, in the order they run."""

    before: list[StateCopy] = field(default_factory=list)  # before resets: saves of freed slots, demotions
    restores: list[StateCopy] = field(default_factory=list)  # after the resets, before the model: new slots
    after: list[StateCopy] = field(default_factory=list)  # after the model and forks: prompt chunk ends

    def __bool__(self) -> bool:
        return bool(self.before or self.restores or self.after)


@dataclass(frozen=True)
class PrefixCacheConfig:
    device_rows: int  # snapshots the device tier holds
    host_rows: int  # snapshots the host tier holds
    row_bytes: int  # bytes of one snapshot (one state slot)
    interval: int  # snapshot long prompts every this many tokens (0: never by count)


@dataclass(eq=False)
class Snapshot:
    node: Node[Snapshot]  # its tokens: the path to the node (node.depth tokens)
    tier: Tier  # DEVICE or HOST
    row: int
    ready: bool  # its save has run (or runs before any restore of the step)
    locks: int = 0  # restores queued this step


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens of requests looked up
    hits: int = 0  # of them, tokens restored from snapshots
    device_bytes: int = 0  # bytes of snapshots held in device memory
    host_bytes: int = 0  # and in host memory


class PrefixCache:
    def __init__(self, config: PrefixCacheConfig) -> None:
        if config.device_rows < 0 or config.host_rows < 0 or config.interval < 0:
            raise ValueError(f"invalid prefix cache config {config}")
        self.config = config
        self.tree: RadixTree[Snapshot] = RadixTree()
        self.free = {Tier.DEVICE: list(range(config.device_rows - 1, -1, -1)),
                     Tier.HOST: list(range(config.host_rows - 1, -1, -1))}
        tiers = (Tier.DEVICE, Tier.HOST)
        self.lru: dict[Tier, OrderedDict[Snapshot, None]] = {t: OrderedDict() for t in tiers}  # oldest first
        self.ops = SnapshotOps()
        self._pending: list[Snapshot] = []  # saved after this step's model: ready from the next step
        self._locked: list[Snapshot] = []  # restored this step
        self._branch: dict[str, int] = {}  # request id -> branch point its prompt snapshots at
        self.low_water = max(1, config.device_rows // 8)  # free device rows kept by demoting ahead
        self._queries = self._hits = 0

    # ---- the scheduler's hooks -------------------------------------------------------------------
    def begin_step(self) -> None:
        """A new schedule: the last step's copies are queued, so its saves are visible, its restores done."""
        for snap in self._pending:
            snap.ready = True
        for snap in self._locked:
            snap.locks -= 1
        self._pending, self._locked = [], []
        while self.config.host_rows and len(self.free[Tier.DEVICE]) < self.low_water:
            victim = self._victim(Tier.DEVICE)
            if victim is None or not self._demote(victim):
                break

    def take_ops(self) -> SnapshotOps:
        ops, self.ops = self.ops, SnapshotOps()
        return ops

    def restore(self, request: Request, slot: int) -> int:
        """Restore the deepest snapshot on the prompt's path into ``slot`` -> tokens it holds (0: none; the
        slot must then be reset)."""
        prompt = request.prompt_token_ids
        limit = len(prompt) - 1
        path, node = self.tree.match(prompt, limit, lambda s: s.ready)
        depth = 0 if node is None else node.depth
        self._queries += len(prompt)
        if path - depth >= BRANCH_MIN_TOKENS:
            self._branch[request.request_id] = path
        if node is None:
            return 0
        snap = node.value
        assert snap is not None
        snap.locks += 1
        self._locked.append(snap)
        self.lru[snap.tier].move_to_end(snap)
        self.ops.restores.append(StateCopy(snap.tier, snap.row, Tier.SLOT, slot, depth))
        self._hits += depth
        return depth

    def next_point(self, request: Request, start: int) -> int:
        """The first snapshot point after ``start``: a prompt chunk from ``start`` ends there or before."""
        end = request.num_prompt_tokens
        if self.config.interval:
            end = min(end, (start // self.config.interval + 1) * self.config.interval)
        branch = self._branch.get(request.request_id, 0)
        return min(end, branch) if branch > start else end

    def prompt_chunk_done(self, request: Request, end: int, slot: int) -> None:
        """A prompt chunk ending at ``end`` is scheduled into ``slot``: save after it at a snapshot point."""
        interval = self.config.interval
        if end == request.num_prompt_tokens:
            self._branch.pop(request.request_id, None)
        elif not (interval and end % interval == 0) and end != self._branch.get(request.request_id):
            return
        self._save(request.prompt_token_ids[:end], slot, after=True)

    def sequence_finished(self, seq: Sequence, fed_last: bool) -> None:
        """Save a finished sequence's slot before anything reuses it. fed_last: its last token was fed
        back (a decode queued ahead, overlap decoding), so the slot absorbed every output token."""
        request = seq.request
        self._branch.pop(request.request_id, None)
        if seq.finish_reason in ("abort", "error") or not seq.token_ids or seq.slot < 0:
            return
        out = seq.token_ids if fed_last else seq.token_ids[:-1]
        self._save(request.prompt_token_ids + out, seq.slot, after=False)

    def take_stats(self) -> PrefixCacheStats:
        row = self.config.row_bytes
        stats = PrefixCacheStats(self._queries, self._hits, self.num_rows(Tier.DEVICE) * row,
                                 self.num_rows(Tier.HOST) * row)
        self._queries = self._hits = 0
        return stats

    def num_rows(self, tier: Tier) -> int:
        return len(self.lru[tier])

    # ---- rows --------------------------------------------------------------------------------------
    def _save(self, tokens: Seq[int], slot: int, after: bool) -> None:
        node = self.tree.find(tokens)
        if node is not None and node.value is not None:  # the same tokens are saved: keep that one
            self.lru[node.value.tier].move_to_end(node.value)
            return
        where = self._allocate()
        if where is None:
            return
        tier, row = where
        node = self.tree.insert(tokens)
        snap = Snapshot(node, tier, row, ready=not after)
        node.value = snap
        self.lru[tier][snap] = None
        save = StateCopy(Tier.SLOT, slot, tier, row, len(tokens))
        (self.ops.after if after else self.ops.before).append(save)
        if after:
            self._pending.append(snap)

    def _allocate(self) -> tuple[Tier, int] | None:
        """A free row, device first, evicting the least recently used snapshot if needed."""
        if self.config.device_rows:
            if not self.free[Tier.DEVICE]:
                victim = self._victim(Tier.DEVICE)
                if victim is None:
                    return None
                if not (self.config.host_rows and self._demote(victim)):
                    self._drop(victim)
            return Tier.DEVICE, self.free[Tier.DEVICE].pop()
        host = self._host_row() if self.config.host_rows else None
        return None if host is None else (Tier.HOST, host)

    def _demote(self, snap: Snapshot) -> bool:
        """Move a device snapshot to a host row (copied before this step's saves); its device row goes to
        the bottom of the free rows. False where no host row can be had."""
        host = self._host_row()
        if host is None:
            return False
        self.ops.before.append(StateCopy(Tier.DEVICE, snap.row, Tier.HOST, host, snap.node.depth))
        del self.lru[Tier.DEVICE][snap]
        self.free[Tier.DEVICE].insert(0, snap.row)
        snap.tier, snap.row = Tier.HOST, host
        self.lru[Tier.HOST][snap] = None
        return True

    def _host_row(self) -> int | None:
        if not self.free[Tier.HOST]:
            victim = self._victim(Tier.HOST)
            if victim is None:
                return None
            self._drop(victim)
        return self.free[Tier.HOST].pop()

    def _victim(self, tier: Tier) -> Snapshot | None:
        return next((s for s in self.lru[tier] if s.ready and not s.locks), None)

    def _drop(self, snap: Snapshot) -> None:
        del self.lru[snap.tier][snap]
        self.free[snap.tier].append(snap.row)
        self.tree.remove(snap.node)

"""Batched sampling with per-request parameters, on the logits' device.

Order per row: penalties (repetition over prompt + output, presence / frequency over the output) →
min_tokens (stop and EOS ids masked) → greedy argmax, or temperature → top_k → top_p → min_p →
softmax → exponential race (argmax of p / q, q ~ Exp(1)). A seeded sequence draws its q from its own
pair of torch.Generators, one draw of [V] each per token, so its samples do not depend on the batch it
runs in; two generators seeded with the seed's low and high 32 bits make all 64 count (the CPU
generator, a Mersenne Twister, keeps only 32 bits of its seed). Overflowed or NaN logits (extreme
penalties) are clamped to finite values, so a row always has a token to pick.
A grammar's token mask (structured outputs) applies right after min_tokens.
Logprobs are the log-softmax of the raw model logits (before penalties, temperature and filtering).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels
from .request import Sequence


@dataclass
class RowLogprobs:
    sampled: float  # logprob of the sampled token
    top_ids: list[int]  # the params.logprobs most likely tokens, most likely first
    top_logprobs: list[float]


@dataclass
class TokenMask:
    """The tokens grammars allow in this step, for the constrained rows only."""

    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32 on the logits' device; bit v allows token v
    rows: torch.Tensor  # [R] int64 on the logits' device: the logits row of each bitmask row

    def row(self, i: int) -> TokenMask | None:
        """The mask of logits row i alone, as row 0 (row-by-row sampling); None if it has none."""
        hit = (self.rows == i).nonzero().flatten()
        return TokenMask(self.bitmask[hit], torch.zeros_like(hit)) if hit.numel() else None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [N] one per row
    logprobs: list[RowLogprobs | None]  # [N] None where the request did not ask


_FINITE = torch.finfo(torch.float32).max
_HIGH_SEED_SALT = 0x9E37_79B9  # keeps the two generators apart when a seed's halves are equal


def derive_seed(seed: int, index: int) -> int:
    """Sample `index` of an n > 1 request gets its own 64-bit stream; sample 0 uses the seed itself."""
    return seed if index == 0 else hash((seed, index)) & 0xFFFF_FFFF_FFFF_FFFF


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded requests
        # seq_id -> the (low, high) generators of a seeded sequence
        self._generators: dict[int, tuple[torch.Generator, torch.Generator]] = {}

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> tuple[torch.Generator, torch.Generator]:
        gens = self._generators.get(seq.seq_id)
        if gens is None:
            seed = derive_seed(int(seq.request.params.seed64), seq.index)  # type: ignore[arg-type]
            low = torch.Generator(device=self.device).manual_seed(seed & 0xFFFF_FFFF)
            high = torch.Generator(device=self.device).manual_seed((seed >> 32) ^ _HIGH_SEED_SALT)
            gens = self._generators[seq.seq_id] = (low, high)
        return gens

    def _seeded_exponential(self, seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
        """[V] Exp(1) draws from the sequence's own generators: frac(U_low + U_high) is uniform."""
        low, high = self._generator(seq)
        u = torch.rand(vocab, generator=low, device=device) + torch.rand(vocab, generator=high, device=device)
        return -torch.log1p(-(u - u.floor()))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               before_sync: Callable[[torch.Tensor], None] | None = None,
               mask: TokenMask | None = None) -> SamplerOutput:
        """logits: [N, V] (any float dtype), row i for seqs[i] -> one token per row; ``mask`` restricts
        the rows of constrained sequences to the tokens their grammars allow (logprobs stay raw).

        before_sync(token_ids [N] on the device) runs once every device op of the sampling is queued and
        the results' copies to the host are in flight, before the host waits for them: work it queues
        on the device (the next decode step) overlaps with the host's wait and what follows it.
        """
        n_rows, vocab = logits.shape
        if all(_plain_greedy(s) for s in seqs):  # argmax of the raw logits, nothing else to do
            if mask is not None:  # no logprobs in this path: the logits themselves may be masked
                kernels.apply_token_bitmask_(logits, mask.bitmask, mask.rows)
            sampled = logits.argmax(dim=-1)
            (ids,) = _to_host([sampled], before_sync, sampled)
            return SamplerOutput(ids, [None] * n_rows)
        params = [s.request.params for s in seqs]
        raw = logits.float()  # (N, V)
        x = raw.clone()
        self._apply_penalties(x, seqs)
        x.nan_to_num_(nan=-_FINITE, posinf=_FINITE, neginf=-_FINITE)  # extreme penalties overflow
        self._mask_min_tokens(x, seqs)
        if mask is not None:
            kernels.apply_token_bitmask_(x, mask.bitmask, mask.rows)
        greedy = [p.greedy for p in params]
        sampled = x.argmax(dim=-1)  # (N,)
        if not all(greedy):
            idx = [i for i, g in enumerate(greedy) if not g]
            rows = torch.tensor(idx, device=x.device)
            sampled[rows] = self._sample_random(x[rows], [seqs[i] for i in idx])
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: list[RowLogprobs | None] = [None] * n_rows
        if not want:
            (ids,) = _to_host([sampled], before_sync, sampled)
            return SamplerOutput(ids, logprobs)
        rows = torch.tensor(want, device=x.device)
        lp = torch.log_softmax(raw[rows], dim=-1)  # (M, V)
        k = max(int(params[i].logprobs or 0) for i in want)
        top_v, top_i = lp.topk(max(k, 1), dim=-1)  # (M, k)
        picked = lp.gather(1, sampled[rows][:, None])[:, 0]
        ids, picked_l, top_vl, top_il = _to_host([sampled, picked, top_v, top_i], before_sync, sampled)
        for j, i in enumerate(want):
            ki = int(params[i].logprobs or 0)
            logprobs[i] = RowLogprobs(picked_l[j], top_il[j][:ki], top_vl[j][:ki])
        return SamplerOutput(ids, logprobs)

    def _apply_penalties(self, x: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if _has_penalty(s)]
        if not rows:
            return
        vocab = x.shape[1]
        dev = x.device
        out_ids = _pad([seqs[i].token_ids for i in rows], vocab, dev)  # (M, Tout), pad = vocab
        prompt_ids = _pad([seqs[i].request.prompt_token_ids for i in rows], vocab, dev)  # (M, Tp)
        counts = torch.zeros(len(rows), vocab + 1, device=dev)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
        counts = counts[:, :vocab]  # (M, V) output token counts
        in_prompt = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev)
        in_prompt.scatter_(1, prompt_ids, True)
        seen = in_prompt[:, :vocab] | (counts > 0)
        p = [seqs[i].request.params for i in rows]
        rep = torch.tensor([q.repetition_penalty for q in p], device=dev)[:, None]
        freq = torch.tensor([q.frequency_penalty for q in p], device=dev)[:, None]
        pres = torch.tensor([q.presence_penalty for q in p], device=dev)[:, None]
        idx = torch.tensor(rows, device=dev)
        sub = x[idx]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        x[idx] = sub

    def _mask_min_tokens(self, x: torch.Tensor, seqs: list[Sequence]) -> None:
        vocab = x.shape[1]
        pairs = [(i, t) for i, s in enumerate(seqs) if len(s.token_ids) < s.request.params.min_tokens
                 for t in s.request.stop_ids if t < vocab]
        if pairs:
            r, c = zip(*pairs, strict=True)
            x[torch.tensor(r, device=x.device), torch.tensor(c, device=x.device)] = float("-inf")

    def _sample_random(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """x: [M, V] penalised logits of the non-greedy rows -> [M] sampled ids."""
        dev = x.device
        params = [s.request.params for s in seqs]
        vocab = x.shape[1]
        x = x / torch.tensor([p.temperature for p in params], device=dev)[:, None]
        x = x.clamp(max=_FINITE)  # a small temperature may overflow to +inf; masked -inf stays
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        if any(k < vocab for k in top_k) or any(p.top_p < 1.0 for p in params):
            xs, order = x.sort(dim=-1, descending=True)  # (M, V)
            rank = torch.arange(vocab, device=dev)[None, :]
            drop = rank >= torch.tensor(top_k, device=dev)[:, None]
            xs = xs.masked_fill(drop, float("-inf"))
            ps = torch.softmax(xs, dim=-1)
            before = ps.cumsum(dim=-1) - ps  # mass strictly above each token
            drop = before >= torch.tensor([p.top_p for p in params], device=dev)[:, None]
            drop[:, 0] = False
            xs = xs.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, xs)
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.request.params.seed is not None:
                q[i] = self._seeded_exponential(s, vocab, dev)
        return (probs / q.clamp_(min=1e-20)).argmax(dim=-1)


def _to_host(tensors: list[torch.Tensor], before_sync: Callable[[torch.Tensor], None] | None,
             sampled: torch.Tensor) -> list[list]:
    """The tensors as lists; ``before_sync(sampled)`` runs after their copies are queued (CUDA: into
    pinned memory, without blocking) and before the host waits for them."""
    if sampled.device.type != "cuda":
        if before_sync is not None:
            before_sync(sampled)
        return [t.tolist() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(hosts, tensors, strict=True):
        h.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    if before_sync is not None:
        before_sync(sampled)
    copied.synchronize()
    return [h.tolist() for h in hosts]


def _plain_greedy(s: Sequence) -> bool:
    p = s.request.params
    return (p.greedy and p.logprobs is None and not _has_penalty(s)
            and not (len(s.token_ids) < p.min_tokens and s.request.stop_ids))


def _has_penalty(s: Sequence) -> bool:
    p = s.request.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)

"""Structured outputs in the step loop: a grammar matcher per constrained sequence, the step's token masks,
and advancing the matchers by the sampled tokens. Owned by the engine core (its step thread only).

A step's masks are filled on the host while the device runs the step's forward (the runner only queued
it): the rows of constrained sequences go into a pinned int32 bitmask [rows, ceil(V / 32)] allocated
once, filled by llguidance's thread pool when several rows need one, copied to the device without
blocking and applied to the logits by one kernel (``kernels.apply_token_bitmask_``, in the sampler).
With overlapped decoding the next step's forward never needs a mask (only its sampling does), so the
next mask is computed after the host learns the token, while that forward runs.

A matcher that has nothing left to allow ends its sequence at once ("stop": the grammar is complete, no
EOS step needed); one that reaches a dead end (no token allowed, or a token it cannot take) ends it with
finish_reason "grammar_error" and the engine's reason in stop_reason, before the token reaches the text.
"""

from __future__ import annotations

import llguidance
import torch

from .errors import InvalidRequestError
from .grammar import GrammarCompiler, first_line
from .request import Request, Sequence
from .sampler import TokenMask

GRAMMAR_ERROR = "grammar_error"  # finish_reason of a sequence whose grammar reached a dead end
PARALLEL_FROM = 4  # rows from which llguidance's thread pool fills the masks (one row: no hand-off)


class StructuredOutputs:
    def __init__(self, compiler: GrammarCompiler | None, device: torch.device, max_rows: int) -> None:
        self.compiler = compiler  # None: no grammar engine for this tokenizer, constrained requests refused
        self.device = device
        words = (compiler.vocab_size + 31) // 32 if compiler is not None else 0
        self._host = torch.zeros((max_rows, words), dtype=torch.int32, pin_memory=device.type == "cuda")
        self._executor = llguidance.LLExecutor()
        self._matchers: dict[int, llguidance.LLMatcher] = {}  # seq_id -> matcher, while it runs

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def add(self, request: Request) -> None:
        """One matcher per sample of a constrained request (the grammar is normally cached already)."""
        spec = request.params.structured_outputs
        if spec is None:
            return
        if self.compiler is None:
            raise InvalidRequestError("structured outputs are not available: no grammar engine")
        grammar, _ = self.compiler.get(spec)
        for seq in request.seqs:
            self._matchers[seq.seq_id] = grammar.matcher()

    def release(self, request: Request) -> None:
        for seq in request.seqs:
            self._matchers.pop(seq.seq_id, None)

    def masks(self, seqs: list[Sequence]) -> TokenMask | None:
        """The step's masks for the constrained rows of ``seqs`` (sampler row order); None if none."""
        if not self._matchers or not seqs:
            return None
        todo = [(m, i) for i, s in enumerate(seqs) if (m := self._matchers.get(s.seq_id)) is not None]
        if not todo:
            return None
        host = self._host[:len(todo)]
        if len(todo) >= PARALLEL_FROM:
            self._executor.unsafe_compute_mask_ptr([(m, r) for r, (m, _) in enumerate(todo)], host.data_ptr(),
                                                   host.shape[1] * 4, host.shape[0])
        else:
            for r, (m, _) in enumerate(todo):
                m.unsafe_compute_mask_ptr(host[r].data_ptr(), host.shape[1] * 4)
        rows = torch.tensor([i for _, i in todo], dtype=torch.long)
        return TokenMask(bitmask=host.to(self.device, non_blocking=True),
                         rows=rows.to(self.device, non_blocking=True))

    def accept(self, seq: Sequence, token_id: int) -> tuple[str, str | None] | None:
        """Advance the sequence's matcher by its sampled token -> (finish_reason, stop_reason) when the
        grammar ends the sequence here, else None. A grammar_error's token is not the sequence's."""
        m = self._matchers.get(seq.seq_id)
        if m is None:
            return None
        if m.is_error() or not m.consume_token(token_id):
            return GRAMMAR_ERROR, first_line(m.get_error() or m.stop_reason())
        if m.is_stopped():
            return ("stop", None) if m.is_accepting() else (GRAMMAR_ERROR, first_line(m.stop_reason()))
        return None

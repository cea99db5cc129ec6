"""ModelState: the per-layer state pools of every running sequence, allocated once (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels.state import BW, PooledState, W, num_levels_for
from .model_config import ModelConfig


def device_ints(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of host values on ``device``; on CUDA through pinned memory, queued without making
    the host wait for the device."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class ModelState:
    """Slot p of every tensor belongs to one sequence; the engine hands out slots.

    levels: per layer [P, L, H, K, V] in state_dtype (float32 default, bfloat16 allowed), the Fenwick levels
        as stored: level l of slot p at position t is levels[p, l] * exp(decay[p, t % 2, l]) per head;
    decay: per layer [P, 2, L, H] float32, the log-decay each stored level still owes (-inf: empty), in
        two buffers by position parity (a decode step reads one and writes the other; see
        ``kernels.naive.fused_recurrent_step_ref``); so a step rewrites two blocks, not every live one;
    conv: per layer [P, conv_dim, conv_kernel - 1] in the model dtype, the last conv1d inputs (oldest first);
    positions: [P] int64, tokens absorbed per slot.
    The per-layer tensors are slices of one [layers, P, ...] tensor per kind (``all_levels``,
    ``all_conv``, ``all_decay``): a reset, fork or settle is one launch per kind, not one per layer.
    """

    all_levels: torch.Tensor
    all_conv: torch.Tensor
    all_decay: torch.Tensor
    positions: torch.Tensor
    # the low levels as raw tokens (the token window, kernels/state.py; where levels > BW + 1):
    # [layers, P, 2, W, G, K], [layers, P, 2, W, H, V], [layers, P, 2, W, H]
    all_window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    levels: list[torch.Tensor] = field(init=False, repr=False)
    conv: list[torch.Tensor] = field(init=False, repr=False)
    decay: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.levels = list(self.all_levels.unbind(0))
        self.conv = list(self.all_conv.unbind(0))
        self.decay = list(self.all_decay.unbind(0))

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Layer ``layer``'s token window (win_k, win_v, win_g), or None for a pool without windows."""
        return None if self.all_window is None else tuple(t[layer] for t in self.all_window)  # type: ignore

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, state_dtype: torch.dtype = torch.float32,
                 num_levels: int | None = None, token_window: bool = True) -> ModelState:
        """num_levels: Fenwick levels per slot; None: the model's lambda_levels. Sequences of at most
        n tokens use num_levels_for(n) of them (``levels_for``), so a shorter max_model_len needs fewer."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        L = config.lambda_levels if num_levels is None else num_levels
        if not 1 <= L <= config.lambda_levels:
            raise ValueError(f"num_levels must be in [1, {config.lambda_levels}], got {num_levels}")
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        c = config
        P, n, H = num_slots, c.num_hidden_layers, c.num_heads
        window, low = None, 0
        if token_window and L > BW + 1:  # levels 0..BW become the window's rows: the pool drops them
            window = (torch.zeros(n, P, 2, W, c.n_groups, c.state_size, device=device, dtype=dtype),
                      torch.zeros(n, P, 2, W, H, c.head_dim, device=device, dtype=dtype),
                      torch.zeros(n, P, 2, W, H, device=device, dtype=torch.float32))
            low = BW + 1
        return cls(torch.zeros(n, P, L - low, H, c.state_size, c.head_dim, device=device, dtype=state_dtype),
                   torch.zeros(n, P, c.conv_dim, c.conv_kernel - 1, device=device, dtype=dtype),
                   torch.zeros(n, P, 2, L, H, device=device, dtype=torch.float32),
                   torch.zeros(P, device=device, dtype=torch.int64), window)

    @staticmethod
    def levels_for(config: ModelConfig, max_model_len: int) -> int:
        """Levels that sequences of up to max_model_len tokens can reach (at most lambda_levels)."""
        return min(config.lambda_levels, num_levels_for(max_model_len))

    @property
    def num_levels(self) -> int:
        """Fenwick levels per slot (a windowed pool stores the top num_levels - BW - 1 as blocks)."""
        return self.all_decay.shape[3]

    @property
    def low_level(self) -> int:
        """The first level stored as a block: BW + 1 with a token window, else 0."""
        return self.num_levels - self.all_levels.shape[2]

    @property
    def num_slots(self) -> int:
        return self.positions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def _index(self, slots: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        if isinstance(slots, torch.Tensor):
            return slots.to(self.device, torch.int64).reshape(-1)
        return device_ints([slots] if isinstance(slots, int) else list(slots), self.device)

    def reset(self, slots: torch.Tensor | Sequence[int] | int, levels: bool = True) -> None:
        """Zero the slots: a new sequence starts there. levels=False leaves the levels as they are, for
        slots whose levels the next call overwrites whole (a prefill from position 0)."""
        idx = self._index(slots)
        # index_fill_, not t[idx] = 0: that copies the 0 from the host and waits
        for t in (*((self.all_levels,) if levels else ()), self.all_conv, self.all_decay):
            t.index_fill_(1, idx, 0)
        self.positions.index_fill_(0, idx, 0)

    def copy_(self, src: int, dst: torch.Tensor | Sequence[int] | int) -> None:
        """Fork: copy slot ``src`` into every slot of ``dst`` (for n > 1 samples of one prompt)."""
        idx = self._index(dst)
        for t in (self.all_levels, self.all_conv, self.all_decay, *(self.all_window or ())):
            t[:, idx] = t[:, src:src + 1].clone()
        self.positions[idx] = self.positions[src].clone()

    @property
    def bytes_per_slot(self) -> int:
        stacks = (self.all_levels, self.all_conv, self.all_decay, *(self.all_window or ()))
        return sum(t[:, 0].numel() * t.element_size() for t in stacks) + self.positions.element_size()

    @property
    def nbytes(self) -> int:
        tensors = (self.all_levels, self.all_conv, self.all_decay, *(self.all_window or ()), self.positions)
        return sum(t.numel() * t.element_size() for t in tensors)

    def pooled(self, layer: int, slots: torch.Tensor, positions: torch.Tensor) -> PooledState:
        """The state of ``slots`` at ``positions`` in one layer, where it lies (a prefill's initial state,
        read by the kernel that needs it)."""
        return PooledState(self.levels[layer], self.decay[layer], slots, positions, self.window(layer))

    def settle(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """After a prefill wrote the slots' levels whole (as S): no decay owed at ``positions`` (device
        tensors; no host synchronisation)."""
        self.all_decay.flatten(1, 2).index_fill_(1, slots * 2 + positions % 2, 0.0)  # [layers, P * 2, L, H]

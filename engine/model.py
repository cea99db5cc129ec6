"""Log-linear Mamba-2 causal LM, weight-compatible with FLA's ``log_linear_mamba2`` (DESIGN §2).

Three entry points share the layers: ``forward`` (full sequences from an empty state, for tests and
training), ``prefill`` (packed chunks continuing from the state pool) and ``decode`` (one token per
sequence, in place on the pool, free of host synchronisation so that it can be CUDA-graph captured).
``prefill`` and ``decode`` call the fused ops of ``kernels`` (residual adds inside the next norm, one
GEMM for gate and up, the mixer's fused inputs and output gate), which run Triton on CUDA and their
PyTorch references on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels.ops import mul_to
from .mixer import LogLinearMamba2Mixer, RMSNorm
from .model_config import ModelConfig
from .model_state import ModelState
from .prefill_batch import PrefillBatch, PrefillShape, prefill_arrays, upload

# Rows up to which decode on CUDA takes the fused GEMVs (kernels.rmsnorm_linear, ...) instead of cuBLAS
# and separate norm kernels: faster up to 4 rows (bench/gemv.py; docs/kernels-notes.md)
GEMV_MAX_ROWS = 4


class GatedMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases (FLA's GatedMLP)."""

    def __init__(self, hidden: int, intermediate: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.gate_up_weight: torch.Tensor | None = None  # [2 * I, hidden] after fuse_gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu in float32; the product promotes up_proj's output and is stored in the model dtype
        return self.down_proj(mul_to(F.silu(self.gate_proj(x).float()), self.up_proj(x), x.dtype))

    def fuse_gate_up(self) -> None:
        """Store gate_proj and up_proj as the two halves of one [2 * I, hidden] weight, so that
        ``forward_fused`` runs one GEMM for both (the parameters become views of it; names and values
        are unchanged). The engine does it once after loading."""
        if self.gate_up_weight is not None:
            return
        w = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        I = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data = w[:I]
        self.up_proj.weight.data = w[I:]
        self.gate_up_weight = w

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """[gate_proj(x) | up_proj(x)]: [..., 2 * I], one GEMM once ``fuse_gate_up`` has run."""
        if self.gate_up_weight is None:
            return torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return F.linear(x, self.gate_up_weight)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with gate and up from ``gate_up`` and one SiLU-mul kernel."""
        return self.down_proj(kernels.silu_mul(self.gate_up(x)))


class LogLinearMamba2Block(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps, device=device)
        self.mixer = LogLinearMamba2Mixer(config, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, device=device)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_intermediate_size, device=device, dtype=dtype)

    def mixer_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.mixer_norm(h, h.dtype)

    def add_mlp(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.mlp_norm(h, h.dtype))


class LogLinearMamba2Model(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(LogLinearMamba2Block(config, device, dtype)
                                    for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps, device=device)


class LogLinearMamba2ForCausalLM(nn.Module):
    """``state_dict()`` names equal FLA's checkpoint names; ``lm_head.weight`` is the embedding when tied."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.backbone = LogLinearMamba2Model(config, device, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device,
                                 dtype=dtype)
        self.tie_weights()

    def fuse_gate_up(self) -> None:
        """One GEMM for gate and up in every layer's MLP (``GatedMLP.fuse_gate_up``)."""
        for layer in self.backbone.layers:
            layer.mlp.fuse_gate_up()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone.norm_f(h, h.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab] in the model dtype (full sequences, empty state)."""
        if input_ids.shape[1] > self.config.max_model_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_model_len="
                             f"{self.config.max_model_len}")
        h = self.backbone.embeddings(input_ids)  # (B, T, hidden)
        for layer in self.backbone.layers:
            h = h + layer.mixer(layer.mixer_input(h))
            h = layer.add_mlp(h)
        return self._logits(h)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, state: ModelState,
                slots: torch.Tensor, starts: list[int] | None = None) -> torch.Tensor:
        """Continue N packed sequences from their slots and write the state back.

        Args:
            input_ids: [T_total] the new tokens of N sequences, packed;
            cu_seqlens: [N + 1] cumulative lengths (each sequence has at least one token);
            state: the pool; slots: [N] distinct slot indices;
            starts: state.positions[slots] as the host knows them (the engine does); read back if None.
        Returns:
            logits of each sequence's last token: [N, vocab] float32. Advances state.positions[slots].
        """
        bounds = cu_seqlens.tolist()
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        slot_list = torch.as_tensor(slots).tolist()
        if starts is None:
            starts = state.positions[torch.as_tensor(slots, device=state.device)].tolist()
        if len(slot_list) != len(lens) or bounds[-1] != input_ids.numel():
            raise ValueError(f"prefill: cu_seqlens {bounds} does not match {len(slot_list)} slots and "
                             f"{input_ids.numel()} tokens")
        batch = self.prefill_batch(input_ids.tolist(), slot_list, list(starts), lens, state)
        return self.run_prefill(batch, state)

    def prefill_batch(self, token_ids: list[int], slots: list[int], starts: list[int], lens: list[int],
                      state: ModelState, pad: PrefillShape | None = None, pad_slot: int = 0) -> PrefillBatch:
        """A prompt step's inputs, checked against max_model_len and moved to the device in one copy
        (``prefill_batch.py``); padded to ``pad`` if given."""
        if len(starts) != len(lens) or any(n < 1 or s + n > self.config.max_model_len
                                           for s, n in zip(starts, lens, strict=True)):
            raise ValueError(f"prefill: sequence lengths {lens} from positions {starts} must be >= 1 token "
                             f"and end within max_model_len={self.config.max_model_len}")
        parts, layout = prefill_arrays(token_ids, slots, starts, lens, num_levels=state.num_levels,
                                       window=state.all_window is not None,
                                       chunk_plan=self.device.type == "cuda" and kernels.has_triton(),
                                       pad=pad, pad_slot=pad_slot)
        bounds = parts[2].tolist()
        return PrefillBatch.bind(upload(parts, layout, self.device), layout, bounds, parts[4].tolist())

    @torch.no_grad()
    def run_prefill(self, batch: PrefillBatch, state: ModelState) -> torch.Tensor:
        """``prefill`` of a step's inputs on the device: device work only (no upload, no read-back), so
        that it can be captured in a CUDA graph (engine/prefill_graphs.py). The slots' positions must be
        the batch's starts. Returns the logits of every sequence of the batch, padding included:
        [N, vocab] float32."""
        cu, start, slots = batch.cu, batch.starts, batch.slots
        h = self.backbone.embeddings(batch.ids)  # (T_total, hidden)
        rows = None if batch.window is None else batch.window.bind(slots)
        eps = self.config.norm_eps
        delta = None
        for i, layer in enumerate(self.backbone.layers):
            x, h = kernels.add_rmsnorm(h, delta, layer.mixer_norm.weight, eps)
            mixer = layer.mixer
            pooled = state.pooled(i, slots, start) if batch.continuing else None  # read in the kernel
            window = None if rows is None else (state.window(i), rows)
            y = mixer.prefill(mixer.in_proj(x), cu, state.conv[i], state.levels[i], slots, pooled, window,
                              state.num_levels, batch.chunk)
            delta = mixer.out_proj(y)
            x, h = kernels.add_rmsnorm(h, delta, layer.mlp_norm.weight, eps)
            delta = layer.mlp.forward_fused(x)
        last = cu[1:] - 1
        x = kernels.add_rmsnorm(h[last], delta[last], self.backbone.norm_f.weight, eps)[0]
        end = start + batch.lens
        state.settle(slots, end)
        state.positions[slots] = end
        return self.lm_head(x).float()

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, state: ModelState, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of N sequences at its own position.

        Args:
            input_ids: [N]; state: the pool; slots: [N] int64 distinct slot indices on the model's device.
        Returns:
            logits [N, vocab] float32. Updates the slots' levels and conv states in place and advances
            state.positions[slots]; no host synchronisation (CUDA-graph capturable for a fixed N). Each
            residual add rides in the next norm: about ten launches per layer.
        """
        positions = state.positions[slots]  # (N,)
        h = self.backbone.embeddings(input_ids)  # (N, hidden)
        if self.small_batch_gemv(h):
            return self._decode_gemv(h, state, slots, positions)
        eps = self.config.norm_eps
        delta = None
        for i, layer in enumerate(self.backbone.layers):
            x, h = kernels.add_rmsnorm(h, delta, layer.mixer_norm.weight, eps)
            mixer = layer.mixer
            y = mixer.decode(mixer.in_proj(x), state.conv[i], state.levels[i], slots, positions,
                             state.decay[i], state.window(i))
            delta = mixer.out_proj(y)
            x, h = kernels.add_rmsnorm(h, delta, layer.mlp_norm.weight, eps)
            delta = layer.mlp.forward_fused(x)
        x, _ = kernels.add_rmsnorm(h, delta, self.backbone.norm_f.weight, eps)
        state.positions[slots] = positions + 1
        return self.lm_head(x).float()

    def small_batch_gemv(self, h: torch.Tensor) -> bool:
        """Whether ``decode`` takes the GEMV path: a few rows on CUDA, bias-free projections, gate and
        up fused."""
        return (h.is_cuda and h.shape[0] <= GEMV_MAX_ROWS and not self.config.use_bias
                and self.backbone.layers[0].mlp.gate_up_weight is not None)

    def _decode_gemv(self, h: torch.Tensor, state: ModelState, slots: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """``decode`` for a few rows: each norm rides in the GEMV after it and each residual add in the
        GEMV before it (kernels.rmsnorm_linear, ...), so a layer is seven launches. Same math."""
        eps = self.config.norm_eps
        for i, layer in enumerate(self.backbone.layers):
            mixer = layer.mixer
            proj = kernels.rmsnorm_linear(h, layer.mixer_norm.weight, eps, mixer.in_proj.weight)
            y = mixer.decode(proj, state.conv[i], state.levels[i], slots, positions, state.decay[i],
                             state.window(i))
            h = kernels.linear_residual(y, mixer.out_proj.weight, h)
            a = kernels.rmsnorm_linear_silu_mul(h, layer.mlp_norm.weight, eps, layer.mlp.gate_up_weight)
            h = kernels.linear_residual(a, layer.mlp.down_proj.weight, h)
        state.positions[slots] = positions + 1
        x, _ = kernels.add_rmsnorm(h, None, self.backbone.norm_f.weight, eps)
        return self.lm_head(x).float()  # cuBLAS beats the GEMV on the wide vocabulary head (bench/gemv.py)

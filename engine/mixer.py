"""The log-linear Mamba-2 mixer (DESIGN §2): in_proj → conv1d → log-linear attention → gated norm → out_proj.

Parameter names and shapes follow FLA's ``LogLinearMamba2`` layer so that its checkpoints load unchanged.
Small parameters (A_log, dt_bias, D, L, the λ MLP and every norm weight) are kept in float32 and the
norms, Δ, g and λ are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels.chunk_plan import ChunkPlan
from ..kernels.ops import mul_to, rms_norm
from ..kernels.state import PooledState
from .model_config import ModelConfig


def inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class RMSNorm(nn.Module):
    """RMSNorm in float32 over groups of ``group_size`` channels; the weight is stored in float32."""

    def __init__(self, size: int, eps: float, group_size: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or size
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised x, computed in float32 and returned in ``dtype`` (the last multiply casts)."""
        return rms_norm(x, self.weight, self.eps, self.group_size, dtype)


class LambdaMLP(nn.Module):
    """Adaptive decay: λ = softplus(fc2(GELU(fc1(dl)))) over the level axis, shared across heads."""

    def __init__(self, levels: int, hidden: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(levels, hidden, device=device, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden, levels, device=device, dtype=torch.float32)
        if self.fc2.weight.device.type != "meta":
            with torch.no_grad():
                self.fc2.weight.zero_()
                self.fc2.bias.fill_(inv_softplus(1.0))  # λ = 1 at initialisation

    def forward(self, dl: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.fc2(F.gelu(self.fc1(dl.float()))))


class LogLinearMamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        c = config
        self.config = c
        H, I, W = c.num_heads, c.intermediate_size, c.conv_kernel
        f32 = dict(device=device, dtype=torch.float32)
        self.in_proj = nn.Linear(c.hidden_size, c.in_proj_size, bias=c.use_bias, device=device, dtype=dtype)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, W, groups=c.conv_dim, padding=W - 1,
                                bias=c.use_conv_bias, device=device, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.full((H,), inv_softplus(0.01), **f32))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, **f32)))
        if c.lambda_mode == "linear":
            self.L = nn.Parameter(torch.ones(H, c.lambda_levels, **f32))
        elif c.lambda_mode == "mlp":
            self.lambda_mlp = LambdaMLP(c.lambda_levels, c.lambda_mlp_hidden, device=device)
        self.D = nn.Parameter(torch.ones(I if c.D_has_hdim else H, **f32))
        if c.rmsnorm:
            self.norm = RMSNorm(I, c.norm_eps, group_size=I // c.n_groups, device=device)
        self.out_proj = nn.Linear(I, c.hidden_size, bias=c.use_bias, device=device, dtype=dtype)

    # ---- pieces shared by every path --------------------------------------------------------------
    def _split(self, proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.config
        sizes = [c.intermediate_size, c.conv_dim, c.num_heads, c.num_heads * c.lambda_levels]
        return proj.split(sizes, dim=-1)

    def _level_scales(self, dl: torch.Tensor) -> torch.Tensor:
        """dl: [..., H * L] -> λ: [..., H, L] float32."""
        c = self.config
        dl = dl.unflatten(-1, (c.num_heads, c.lambda_levels))  # (..., H, L)
        if c.lambda_mode == "linear":
            return F.softplus(self.L * dl)  # float32: the product promotes dl
        if c.lambda_mode == "mlp":
            return self.lambda_mlp(dl)
        return torch.ones(dl.shape, device=dl.device, dtype=torch.float32)

    def _attn_inputs(self, xBC: torch.Tensor, dt: torch.Tensor, dl: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """xBC (after conv + SiLU): [..., conv_dim]; dt: [..., H]; dl: [..., H * L].

        Returns q, k: [..., G, K]; v, x: [..., H, V]; g: [..., H] float32; λ: [..., H, L] float32.
        """
        c = self.config
        GK = c.n_groups * c.state_size
        x, B, C = xBC.split([c.intermediate_size, GK, GK], dim=-1)
        x = x.unflatten(-1, (c.num_heads, c.head_dim))  # (..., H, V)
        delta = F.softplus(dt + self.dt_bias)  # (..., H) float32: the sum promotes dt
        g = -torch.exp(self.A_log) * delta
        v = mul_to(x, delta[..., None], x.dtype)
        q = C.unflatten(-1, (c.n_groups, c.state_size))  # (..., G, K)
        k = B.unflatten(-1, (c.n_groups, c.state_size))
        return q, k, v, g, self._level_scales(dl), x

    def _output(self, o: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, x: [..., H, V]; z: [..., I] -> out_proj(norm(y, z)): [..., hidden]."""
        c = self.config
        D = self.D.view(c.num_heads, c.head_dim) if c.D_has_hdim else self.D[:, None]
        dtype = self.out_proj.weight.dtype
        y = torch.addcmul(o, x, D).flatten(-2)  # (..., I) o + x * D, float32 (D is)
        if not c.rmsnorm:
            y = mul_to(y, F.silu(z.float()), dtype)
        elif c.norm_before_gate:
            y = mul_to(self.norm(y), F.silu(z.float()), dtype)
        else:
            y = self.norm(y * F.silu(z.float()), dtype)
        return self.out_proj(y)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0].float()  # (conv_dim, W)

    # ---- full sequence from an empty state --------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, hidden] -> [B, T, hidden]."""
        z, xBC, dt, dl = self._split(self.in_proj(h))
        xBC = F.silu(self._causal_conv(xBC.float().transpose(1, 2)))  # (B, conv_dim, T)
        xBC = xBC.transpose(1, 2).to(h.dtype)  # (B, T, conv_dim)
        q, k, v, g, lam, x = self._attn_inputs(xBC, dt, dl)
        o, _ = kernels.chunk_log_linear_attn(q, k, v, g, lam, scale=1.0)
        return self._output(o, x, z)

    def _causal_conv(self, xf: torch.Tensor) -> torch.Tensor:
        """xf: [B, conv_dim, T] float32 -> causal depthwise conv: [B, conv_dim, T] (before SiLU)."""
        W = self.config.conv_kernel
        bias = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        return F.conv1d(F.pad(xf, (W - 1, 0)), self._conv_weight()[:, None], bias, groups=xf.shape[1])

    # ---- packed sequences continuing from the pool ----------------------------------------------
    def prefill(self, proj: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                levels_pool: torch.Tensor, slots: torch.Tensor, initial: PooledState | None,
                token_window: tuple | None = None, num_levels: int | None = None,
                chunk_plan: ChunkPlan | None = None) -> torch.Tensor:
        """Continue N packed sequences from their slots, between in_proj and out_proj: conv + Δ + g + λ of
        the packed rows in one call (kernels.mixer_prefill_inputs, which also writes each slot's new
        conv state), the chunked attention, and D skip + gated norm in one kernel (kernels.gated_rmsnorm).

        proj: [T_total, in_proj_size] = in_proj(normed input); initial: the sequences' states, or None
        when every sequence starts empty. The final levels go straight into levels_pool[slots] (in its
        dtype; a windowed pool stores only its top levels). num_levels: the pool's Fenwick levels (None:
        levels_pool.shape[1], a pool without a window). chunk_plan: the Triton prefill's plan of the step
        (kernels/chunk_plan.py), shared by the layers. Returns y [T_total, I] in the model dtype, the
        input of out_proj.
        """
        c = self.config
        I, GK, H = c.intermediate_size, c.n_groups * c.state_size, c.num_heads
        xBC, v, g, lam = kernels.mixer_prefill_inputs(
            proj, cu_seqlens, conv_pool, slots, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias,
            self.A_log, intermediate_size=I, n_groups=c.n_groups, state_size=c.state_size, num_heads=H,
            head_dim=c.head_dim, lambda_levels=c.lambda_levels, lambda_mode=c.lambda_mode,
            lambda_L=getattr(self, "L", None), **_mlp_weights(getattr(self, "lambda_mlp", None)))
        x = xBC[:, :I].unflatten(-1, (H, c.head_dim))  # (T, H, V)
        k = xBC[:, I:I + GK].unflatten(-1, (c.n_groups, c.state_size))  # (T, G, K)
        q = xBC[:, I + GK:].unflatten(-1, (c.n_groups, c.state_size))
        lam = lam[..., :num_levels or levels_pool.shape[1]]  # fewer levels for a shorter max_model_len
        o, _ = kernels.chunk_log_linear_attn(q[None], k[None], v[None], g[None], lam[None], scale=1.0,
                                             initial_state=initial, cu_seqlens=cu_seqlens,
                                             final_into=(levels_pool, slots), plan=chunk_plan)
        if token_window is not None:  # (the layer's token window, its WindowRows)
            kernels.write_window(*token_window, k, v, g)
        weight = self.norm.weight if c.rmsnorm else None
        return kernels.gated_rmsnorm(o[0], x, self.D, proj[:, :I], weight, c.norm_eps, I // c.n_groups,
                                     c.norm_before_gate, self.out_proj.weight.dtype)

    # ---- one token per sequence, state pools updated in place -------------------------------------
    def decode(self, proj: torch.Tensor, conv_pool: torch.Tensor, levels_pool: torch.Tensor,
               slots: torch.Tensor, positions: torch.Tensor, decay_pool: torch.Tensor | None = None,
               token_window: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """One token per sequence between in_proj and out_proj, in three launches: conv step + Δ + g + λ
        (kernels.mixer_decode_inputs), the Fenwick step, and D skip + gated norm (kernels.gated_rmsnorm).
        On the CPU the same calls run their PyTorch references. Writes conv_pool[slots] and the slots'
        levels; no host synchronisation.

        proj: [N, in_proj_size] = in_proj(normed input). Returns y: [N, I] in the model dtype, the
        input of out_proj.
        """
        c = self.config
        I, GK, H = c.intermediate_size, c.n_groups * c.state_size, c.num_heads
        xBC, v, g, lam = kernels.mixer_decode_inputs(
            proj, conv_pool, slots, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, self.A_log,
            intermediate_size=I, n_groups=c.n_groups, state_size=c.state_size, num_heads=H,
            head_dim=c.head_dim, lambda_levels=c.lambda_levels, lambda_mode=c.lambda_mode,
            lambda_L=getattr(self, "L", None), **_mlp_weights(getattr(self, "lambda_mlp", None)))
        x = xBC[:, :I].unflatten(-1, (H, c.head_dim))  # (N, H, V)
        k = xBC[:, I:I + GK].unflatten(-1, (c.n_groups, c.state_size))  # (N, G, K)
        q = xBC[:, I + GK:].unflatten(-1, (c.n_groups, c.state_size))
        o = self._step(q, k, v, g, lam, levels_pool, slots, positions, decay_pool, token_window)
        weight = self.norm.weight if c.rmsnorm else None
        return kernels.gated_rmsnorm(o, x, self.D, proj[:, :I], weight, c.norm_eps, I // c.n_groups,
                                     c.norm_before_gate, self.out_proj.weight.dtype)

    @staticmethod
    def _step(q, k, v, g, lam, levels_pool, slots, positions, decay_pool, token_window):
        """The Fenwick step on the pool (λ of the levels the pool holds; a token window if it has one)."""
        L = levels_pool.shape[1] if decay_pool is None else decay_pool.shape[2]  # (a window: fewer blocks)
        lam = lam[..., :L]  # the pool's levels (fewer for a shorter max_model_len)
        if token_window is not None:
            return kernels.window_step(q, k, v, g, lam, levels_pool, decay_pool, token_window, slots,
                                       positions, scale=1.0)
        return kernels.fused_recurrent_step(q, k, v, g, lam, levels_pool, slots, positions, scale=1.0,
                                            level_decay=decay_pool)


def _mlp_weights(mlp: LambdaMLP | None) -> dict[str, torch.Tensor | None]:
    if mlp is None:
        return {}
    return dict(fc1_w=mlp.fc1.weight, fc1_b=mlp.fc1.bias, fc2_w=mlp.fc2.weight, fc2_b=mlp.fc2.bias)

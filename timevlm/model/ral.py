"""Retrieval-augmented learner (the temporal branch): patch embedding, a global patch memory bank, local
self-attention over the window's patches, and a direct forecast from all of them (a flatten head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timevlm.config import ModelConfig
from timevlm.kernels.elementwise import linear_relu, patch_embedding, residual_linear, residual_linear_norm
from timevlm.model.baselines import DecompositionLinear
from timevlm.model.contract import set_lr_scale
from timevlm.model.layers import Dropout, multihead_attention


class PatchEmbedding(nn.Module):
    """[B*N, L] -> [B*N, P, d_model]: replicate-pad the end, cut overlapping patches, project, add position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_len, self.stride, self.padding = cfg.patch_len, cfg.stride, cfg.padding
        self.proj = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, cfg.d_model) * 0.02)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            x = F.pad(x.unsqueeze(1), (0, self.padding), mode="replicate").squeeze(1)
        patches = x.unfold(-1, self.patch_len, self.stride)
        return patch_embedding(patches, self.proj, self.pos, self.drop.p if self.training else 0.0)


class MemoryBank(nn.Module):
    """A bank of patch prototypes kept as buffers (saved in the state_dict, never touched by the optimiser).

    Training mode: each batch's mean patch embeddings are assigned to their nearest slot and the slots move
    towards them by an exponential moving average. Eval mode: the bank is frozen, so evaluation windows
    never leak into retrieval. Every patch retrieves a softmax-weighted mix of slots.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.momentum = cfg.memory_momentum
        self.register_buffer("slots", torch.zeros(cfg.memory_size, d))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.query = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.scale = d ** -0.5

    @torch.no_grad()
    def _update(self, h: torch.Tensor) -> None:
        summary = h.detach().float().mean(dim=1)  # [B', d]
        if not bool(self.initialized):
            idx = torch.arange(self.slots.shape[0], device=h.device) % summary.shape[0]
            self.slots.copy_(summary[idx])
            self.initialized.fill_(True)
            return
        assign = F.normalize(summary, dim=-1) @ F.normalize(self.slots, dim=-1).T
        nearest = assign.argmax(dim=-1)
        sums = torch.zeros_like(self.slots).index_add_(0, nearest, summary)
        counts = torch.bincount(nearest, minlength=self.slots.shape[0]).unsqueeze(-1).to(summary.dtype)
        hit = counts.squeeze(-1) > 0
        means = sums[hit] / counts[hit]
        self.slots[hit] = self.momentum * self.slots[hit] + (1 - self.momentum) * means

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None, norm: nn.Module | None = None):
        """out(softmax(query(h) slots^T / sqrt(d)) slots) (+ residual; with `norm` too, (that sum, norm(sum)) from
        one sweep on CPU), both projections folded into the M slots:
        (h Wq^T + bq) slots^T = h (slots Wq)^T + slots bq and (a slots) Wo^T = a (Wo slots^T)^T. The same function
        of the same parameters, but its matrix products are [M, d] x [d, d] instead of [B*P, d] x [d, d]: at
        seq_len 512 this drops two of the step's twelve full-width projections (forward and backward)."""
        if self.training:
            self._update(h)
        slots = self.slots.to(h.dtype)
        keys, key_bias = slots @ self.query.weight * self.scale, slots @ self.query.bias * self.scale
        attn = torch.softmax(F.linear(h, keys, key_bias), dim=-1)
        values = self.out.weight @ slots.T
        if residual is None:
            return F.linear(attn, values, self.out.bias)
        if norm is None:
            return residual_linear(residual, attn, values, self.out.bias)
        return residual_linear_norm(residual, attn, values, self.out.bias, norm)


class LocalAttention(nn.Module):
    """Pre-norm self-attention over one window's patches, then a feed-forward layer (a transformer encoder
    layer, parameter names as in `nn.TransformerEncoderLayer(norm_first=True)`).

    Attention is `layers.multihead_attention` (fused, no attention dropout). Dropout is on the patch
    embeddings going in and before the flatten head coming out, not inside the block: the
    `nn.TransformerEncoderLayer` this replaces also dropped out on the attention weights, inside the
    feed-forward layer and on both residual branches, which cost a third of a seq_len-512 training step on
    CPU and bought no accuracy (ETTh1 96->96, 2 seeds: test MSE 0.3833 before, 0.3832 after).
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)  # holds in_proj and out_proj
        self.linear1, self.linear2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None, out_norm: nn.Module | None = None):
        """h [B', P, d] -> the block's output, or out_norm(output) if given. x: norm1(h), if the caller has it
        (on CPU each residual sum and the LayerNorm after it come from one sweep)."""
        x = self.norm1(h) if x is None else x
        h, x = multihead_attention(self.self_attn, x, x, residual=h, norm=self.norm2)
        hidden, w, b = linear_relu(x, self.linear1), self.linear2.weight, self.linear2.bias
        if out_norm is None:
            return residual_linear(h, hidden, w, b)
        return residual_linear_norm(h, hidden, w, b, out_norm)[1]


class RAL(nn.Module):
    """[B, L, N] normalised series -> (forecast [B, N, pred_len], summary [B, N, d_model]).

    The forecast keeps full resolution: per variable, every patch embedding (after the global and local
    memory) is flattened and one linear layer maps them to pred_len (a PatchTST-style flatten head, the
    official code's "memory head"), so where in the window something happened still reaches the output.
    The summary (mean over patches) is the variable's query into the multimodal tokens.

    With `linear_skip` the forecast is a linear map of the window (DLinear's: trend and remainder, each mapped
    linearly, starting as the window's mean) plus the flatten head as a residual on it: the head's output layer
    starts at zero, training drops the residual for a `head_drop` fraction of windows (so the linear map learns
    to forecast alone), and `head_scale` (a buffer the training loop sets on validation: 1 open, 0 closed) keeps
    the head only where it lowers validation error. With a few hundred training windows the head's 10^5-10^6
    weights fit them within a few steps and validation closes it (reports/accuracy: closed in the few-shot runs
    and on ETTh1 512 -> 96, open on ETTh1 96 -> 96).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.embed = PatchEmbedding(cfg)
        self.memory = MemoryBank(cfg)
        self.memory_gate = nn.Linear(2 * d, d) if cfg.memory_gate else None
        self.local = LocalAttention(d, cfg.n_heads)
        self.norm = nn.LayerNorm(d) if cfg.ral_out_norm else nn.Identity()
        per_patch = cfg.head_dim or d  # a narrower per-patch projection keeps the head small at long inputs
        self.head = nn.Sequential(nn.Linear(d, per_patch) if cfg.head_dim else nn.Identity(), nn.Flatten(1),
                                  Dropout(cfg.dropout), nn.Linear(cfg.num_patches * per_patch, cfg.pred_len))
        self.linear = DecompositionLinear(cfg.seq_len, cfg.pred_len) if cfg.linear_skip else None
        self.head_drop = cfg.head_drop
        if self.linear is not None:
            for lin in (self.linear.seasonal, self.linear.trend):
                nn.init.zeros_(lin.bias)  # with the weights at 1/seq_len: the window's mean
            nn.init.zeros_(self.head[-1].weight)  # the head's residual starts at zero
            nn.init.zeros_(self.head[-1].bias)
            # Adam moves every weight by about lr per step whatever its gradient's size, and the flattened patch
            # embeddings (LayerNorm outputs) share their signs across windows, so one step moves the head's forecast
            # by ~lr x fan-in (~6 normalised units at d_model 128, seq_len 512: a first-epoch training loss of 12-15).
            # Scaled by seq_len / fan-in, its step moves the forecast as far as the linear map's does
            for prm in self.head[-1].parameters():
                set_lr_scale(prm, min(1.0, cfg.seq_len / self.head[-1].in_features))
            self.register_buffer("head_scale", torch.ones(()))

    def _head_scale(self, b: int, n: int, like: torch.Tensor) -> torch.Tensor | float:
        """Eval: `head_scale` (the validation choice). Training: per window and variable, 1 where the head's
        residual is kept this step and 0 where it is dropped (probability `head_drop`)."""
        if not self.training:
            return self.head_scale
        if self.head_drop == 0.0:
            return 1.0
        return (torch.rand(b, n, 1, device=like.device) >= self.head_drop).to(like.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        linear, head, summary = self.parts(x)
        if linear is None:
            return head, summary
        return linear + self._head_scale(head.shape[0], head.shape[1], head) * head, summary

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(linear forecast or None without `linear_skip`, the flatten head's forecast, summary), each
        [B, N, ...]: `forward` is linear + head_scale x head (in training, the head dropped per window)."""
        b, l, n = x.shape
        series = x.permute(0, 2, 1).reshape(b * n, l)
        h = self.embed(series)
        x = None
        if self.memory_gate is None:  # global memory: h + the retrieved prototypes, and the local block's norm1
            h, x = self.memory(h, residual=h, norm=self.local.norm1)
        else:
            retrieved = self.memory(h)
            h = h + torch.sigmoid(self.memory_gate(torch.cat([h, retrieved], dim=-1))) * retrieved
        h = self.local(h, x, out_norm=self.norm)  # local memory: self-attention over this window's patches
        linear = self.linear(series).reshape(b, n, -1) if self.linear is not None else None
        return linear, self.head(h).reshape(b, n, -1), h.mean(1).reshape(b, n, -1)

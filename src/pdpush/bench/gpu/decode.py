"""A decode workload of Qwen2 shape for the interference curve: random bf16 weights, the real
layer math in torch (RMSNorm, QKV projection with bias, rotary, attention over the context,
output projection, SwiGLU MLP, LM head and greedy pick), batch B, each sequence's context
growing from 1500 towards 2000 and wrapping, one step captured in a CUDA graph.

Everything a step changes (tokens, positions) lives in device buffers updated inside the graph,
so replays need no host work. Attention folds each KV head's group of query heads into the
query-length axis (decode has one query position), which is exact GQA without repeating K/V.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


QWEN2_7B = DecoderShape(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                        intermediate=18944, vocab=152064)
TINY = DecoderShape(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                    intermediate=256, vocab=512)


class DecodeModel:
    """Weights, KV buffers and step state on one device; `step()` runs one decode step."""

    def __init__(self, shape: DecoderShape, batch: int, ctx_lo: int, ctx_hi: int, device: Any,
                 seed: int = 0):
        self.shape, self.batch, self.ctx_lo, self.ctx_hi = shape, batch, ctx_lo, ctx_hi
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        dt = torch.bfloat16

        def w(*size: int) -> Any:
            return (torch.randn(size, generator=gen, device=self.device, dtype=dt) * 0.02)

        s = shape
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = w(s.vocab, s.hidden)
        self.lm_head = w(s.hidden, s.vocab)
        self.norm = torch.ones(s.hidden, device=self.device, dtype=dt)
        self.blocks = [
            dict(ln1=torch.ones(s.hidden, device=self.device, dtype=dt),
                 ln2=torch.ones(s.hidden, device=self.device, dtype=dt),
                 wqkv=w(s.hidden, qkv), bqkv=w(qkv), wo=w(s.heads * s.head_dim, s.hidden),
                 wgu=w(s.hidden, 2 * s.intermediate), wdown=w(s.intermediate, s.hidden))
            for _ in range(s.layers)
        ]
        kv_shape = (batch, s.kv_heads, ctx_hi, s.head_dim)
        self.k_cache = [torch.zeros(kv_shape, device=self.device, dtype=dt) for _ in range(s.layers)]
        self.v_cache = [torch.zeros(kv_shape, device=self.device, dtype=dt) for _ in range(s.layers)]
        start = torch.randint(ctx_lo, ctx_lo + (ctx_hi - ctx_lo) // 5 + 1, (batch,), generator=gen,
                              device=self.device)
        self.start = start
        self.pos = start.clone()
        self.tokens = torch.randint(0, s.vocab, (batch,), generator=gen, device=self.device)
        inv = 1.0 / (1e6 ** (torch.arange(0, s.head_dim, 2, device=self.device) / s.head_dim))
        self.inv_freq = inv.float()
        self.ctx_index = torch.arange(ctx_hi, device=self.device)
        self.graph = None

    def _rms(self, x: Any, weight: Any) -> Any:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight

    def _rotary(self, x: Any, cos: Any, sin: Any) -> Any:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def _attention(self, blk_idx: int, q: Any, k: Any, v: Any) -> Any:
        s, b = self.shape, self.batch
        idx = self.pos.view(b, 1, 1, 1).expand(b, s.kv_heads, 1, s.head_dim)
        self.k_cache[blk_idx].scatter_(2, idx, k.unsqueeze(2))
        self.v_cache[blk_idx].scatter_(2, idx, v.unsqueeze(2))
        group = s.heads // s.kv_heads
        qg = q.view(b, s.kv_heads, group, s.head_dim)
        mask = (self.ctx_index.view(1, -1) <= self.pos.view(-1, 1)).view(b, 1, 1, -1)
        out = F.scaled_dot_product_attention(qg, self.k_cache[blk_idx], self.v_cache[blk_idx],
                                             attn_mask=mask)
        return out.reshape(b, s.heads * s.head_dim)

    def _forward(self) -> None:
        """One decode step for the whole batch; advances tokens and positions in place."""
        s, b = self.shape, self.batch
        x = self.embed[self.tokens]
        freqs = self.pos.float().view(b, 1, 1) * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        for i, blk in enumerate(self.blocks):
            h = self._rms(x, blk["ln1"])
            qkv = h @ blk["wqkv"] + blk["bqkv"]
            q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                 s.kv_heads * s.head_dim], dim=-1)
            q = self._rotary(q.view(b, s.heads, s.head_dim), cos, sin)
            k = self._rotary(k.view(b, s.kv_heads, s.head_dim), cos, sin)
            attn = self._attention(i, q, k, v.view(b, s.kv_heads, s.head_dim))
            x = x + attn @ blk["wo"]
            gate, up = (self._rms(x, blk["ln2"]) @ blk["wgu"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ blk["wdown"]
        logits = self._rms(x, self.norm) @ self.lm_head
        self.tokens.copy_(logits.argmax(-1))
        nxt = self.pos + 1
        self.pos.copy_(torch.where(nxt >= self.ctx_hi, self.start, nxt))

    def capture(self) -> None:
        """Warm up on a side stream, then capture one step as a CUDA graph (CUDA only)."""
        if self.device.type != "cuda":
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()


class StepTimer:
    """Per-step latency: CUDA events around each step on GPU, perf_counter on CPU."""

    def __init__(self, device: Any, steps: int):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(steps)]
        self.cpu_ms: list[float] = []
        self._t0 = 0.0

    def start(self, i: int) -> None:
        if self.cuda:
            self.ev[i][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self, i: int) -> None:
        if self.cuda:
            self.ev[i][1].record()
        else:
            self.cpu_ms.append((time.perf_counter() - self._t0) * 1e3)

    def results_ms(self) -> list[float]:
        if not self.cuda:
            return self.cpu_ms
        self.ev[-1][1].synchronize()
        return [a.elapsed_time(b) for a, b in self.ev]

"""The hand-written CPU attention kernel computes what PyTorch's fused attention computes (values and
gradients, odd sizes included), is counted as the same FLOPs, and its build falls back cleanly."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timevlm.kernels import attention, build


def _reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = qkv.chunk(3, dim=-1)

    def split(t):
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


needs_kernel = pytest.mark.skipif(not attention.usable(torch.zeros(1, 1, 3), 1),
                                  reason="no C++ compiler for the CPU kernels on this machine")


@needs_kernel
@pytest.mark.parametrize("batch,length,heads,head_dim", [
    (6, 64, 4, 32),  # the ETTh1 seq_len-512 step's shape (fewer sequences)
    (3, 12, 4, 8),  # seq_len 96: 12 patches, d_model 32
    (2, 42, 2, 24),  # sizes that are not multiples of the kernel's 4 x 16 tiles
    (1, 1, 1, 16),
    (2, 5, 3, 20),
    (1, 130, 2, 64),
])
def test_kernel_matches_fused_attention_values_and_gradients(batch, length, heads, head_dim):
    torch.manual_seed(0)
    qkv = (torch.randn(batch, length, 3 * heads * head_dim) * 2).requires_grad_(True)
    ref_in = qkv.detach().clone().requires_grad_(True)
    out, lse = torch.ops.timevlm.self_attention(qkv, heads)
    ref = _reference(ref_in, heads)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    q, k, _ = (t.unflatten(-1, (heads, head_dim)) for t in ref_in.detach().chunk(3, -1))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k)
    torch.testing.assert_close(lse, torch.logsumexp(scores / head_dim ** 0.5, dim=-1), rtol=1e-5, atol=2e-5)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(qkv.grad, ref_in.grad, rtol=1e-5, atol=5e-5)


@needs_kernel
def test_kernel_gives_the_same_bits_on_any_number_of_threads():
    torch.manual_seed(1)
    qkv, grad = torch.randn(9, 20, 96), torch.randn(9, 20, 32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = torch.ops.timevlm.self_attention(qkv, 2)
            results.append((out, torch.ops.timevlm.self_attention_backward(grad, qkv, out, lse, 2)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_kernel
def test_flop_counter_counts_the_kernel_as_the_fused_attention_it_replaces():
    qkv = torch.randn(4, 16, 3 * 64, requires_grad=True)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn(qkv).sum().backward()
        return counter.get_total_flops()

    kernel = count(lambda t: torch.ops.timevlm.self_attention(t, 4)[0])
    # PyTorch counts its fused kernels from the same formulas (registered for the CUDA ones)
    expected = 4 * 4 * 4 * 16 * 16 * 16 + 10 * 4 * 4 * 16 * 16 * 16  # forward 2 products, backward 5, of 2*b*h*L*L*D
    assert kernel == expected


def test_build_without_a_compiler_says_why_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    build.load.cache_clear()
    try:
        with caplog.at_level("INFO", logger="timevlm.kernels.build"), warnings.catch_warnings():
            warnings.simplefilter("error")  # by default no console warning, only a log record
            assert build.load("attention") is None
            assert build.load("attention") is None  # cached: said once
        assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()] == [
            "timevlm: the C++ kernel 'attention' is unavailable, PyTorch's own path runs instead: "
            "Command '['/bin/false', '--version']' returned non-zero exit status 1."]
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
        build.load.cache_clear()
        monkeypatch.setenv(build.ENABLE_ENV, "1")  # asked for explicitly: a warning
        with pytest.warns(RuntimeWarning, match="PyTorch's own path runs instead"):
            assert build.load("attention") is None
        assert not attention.usable(torch.zeros(1, 1, 3), 1)
    finally:
        build.load.cache_clear()


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(build.ENABLE_ENV, "0")
    build.load.cache_clear()
    try:
        assert not attention.usable(torch.zeros(1, 1, 3), 1)
        from timevlm.model.layers import multihead_attention

        attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(multihead_attention(attn, x, x), attn(x, x, x, need_weights=False)[0])
    finally:
        build.load.cache_clear()


@needs_kernel
def test_compiled_library_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    first = build.compile_library("attention")
    stamp = first.stat().st_mtime_ns
    assert build.compile_library("attention") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

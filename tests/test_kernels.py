"""The hand-written CPU attention kernel computes what PyTorch's fused attention computes (values and
gradients, odd sizes included), is counted as the same FLOPs, and its build falls back cleanly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timevlm.kernels import attention, build, elementwise, memory


def _reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = qkv.chunk(3, dim=-1)

    def split(t):
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


@pytest.fixture(autouse=True, scope="module", params=["native", "no-avx512"])
def instruction_set(request):
    """Every test here runs twice: with the kernels built for this CPU, and built with AVX-512 off
    (`-mno-avx512f`), so the branches that CPUs without AVX-512 take are compiled and checked on CI's machines too."""
    mp = pytest.MonkeyPatch()
    if request.param == "no-avx512":
        mp.setenv(build.FLAGS_ENV, "-mno-avx512f")
    build.forget()
    yield request.param
    mp.undo()
    build.forget()


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
    bias = torch.randn(3 * heads * head_dim, requires_grad=True)
    ref_in, ref_bias = qkv.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    out, lse = torch.ops.timevlm.self_attention(qkv, bias, heads)
    ref = _reference(ref_in + ref_bias, heads)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    q, k, _ = (t.unflatten(-1, (heads, head_dim)) for t in (ref_in + ref_bias).detach().chunk(3, -1))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k)
    torch.testing.assert_close(lse, torch.logsumexp(scores / head_dim ** 0.5, dim=-1), rtol=1e-5, atol=2e-5)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(qkv.grad, ref_in.grad, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(bias.grad, ref_bias.grad, rtol=1e-5, atol=2e-4)


@needs_kernel
def test_kernel_gives_the_same_results_on_any_number_of_threads():
    torch.manual_seed(1)
    qkv, bias, grad = torch.randn(9, 20, 96), torch.randn(96), torch.randn(9, 20, 32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = torch.ops.timevlm.self_attention(qkv, bias, 2)
            results.append((out, *torch.ops.timevlm.self_attention_backward(grad, qkv, bias, out, lse, 2)))
    finally:
        torch.set_num_threads(before)
    (out1, dqkv1, dbias1), (out2, dqkv2, dbias2) = results
    assert torch.equal(out1, out2) and torch.equal(dqkv1, dqkv2)  # one task per sequence: the same bits
    torch.testing.assert_close(dbias1, dbias2, rtol=1e-6, atol=1e-6)  # per-thread sums, grouped otherwise


@needs_kernel
def test_flop_counter_counts_the_kernel_as_the_fused_attention_it_replaces():
    qkv = torch.randn(4, 16, 3 * 64, requires_grad=True)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn(qkv).sum().backward()
        return counter.get_total_flops()

    kernel = count(lambda t: torch.ops.timevlm.self_attention(t, torch.zeros(3 * 64), 4)[0])
    # PyTorch counts its fused kernels from the same formulas (registered for the CUDA ones)
    expected = 4 * 4 * 4 * 16 * 16 * 16 + 10 * 4 * 4 * 16 * 16 * 16  # forward 2 products, backward 5, of 2*b*h*L*L*D
    assert kernel == expected


@needs_kernel
@pytest.mark.parametrize("shape", [(5, 7, 32), (300, 16), (1, 24)])
def test_linear_relu_matches_relu_of_linear_values_and_gradients(shape):
    torch.manual_seed(2)
    lin = torch.nn.Linear(shape[-1], 48)
    x = torch.randn(*shape, requires_grad=True)
    assert elementwise.linear_relu_usable(x, lin)
    grads = []
    for fn in (lambda t: elementwise.linear_relu(t, lin), lambda t: F.relu(lin(t))):
        x.grad = lin.weight.grad = lin.bias.grad = None
        y = fn(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append((y.detach(), x.grad, lin.weight.grad, lin.bias.grad))
    (y1, gx1, gw1, gb1), (y2, gx2, gw2, gb2) = grads
    assert y1.shape == y2.shape and torch.equal(y1, y2)
    assert torch.equal(gx1, gx2) and torch.equal(gw1, gw2)  # the same mask, the same products
    # the bias gradient, summed in blocks here and by torch's sum there: both against the sum in double
    exact = (torch.linspace(-1, 1, y1.numel()).view_as(y1).double() * (y1 > 0)).reshape(-1, 48).sum(0)
    assert (gb1.double() - exact).abs().max() <= (gb2.double() - exact).abs().max() + 1e-6


@needs_kernel
def test_residual_linear_matches_the_sum_values_and_gradients():
    torch.manual_seed(4)
    lin = torch.nn.Linear(24, 40)
    x, h = torch.randn(3, 11, 24, requires_grad=True), torch.randn(3, 11, 40, requires_grad=True)
    grads = []
    for fn in (lambda: elementwise.residual_linear(h, x, lin.weight, lin.bias), lambda: h + lin(x)):
        x.grad = h.grad = lin.weight.grad = lin.bias.grad = None
        y = fn()
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append((y.detach(), x.grad, h.grad, lin.weight.grad, lin.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(grads[0][2], torch.linspace(-1, 1, 3 * 11 * 40).view(3, 11, 40))  # dh is the gradient


@needs_kernel
def test_residual_linear_norm_matches_the_sum_and_its_layer_norm():
    torch.manual_seed(6)
    lin, ln = torch.nn.Linear(24, 40), torch.nn.LayerNorm(40)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x, h = torch.randn(3, 11, 24, requires_grad=True), torch.randn(3, 11, 40, requires_grad=True)
    leaves = (x, h, lin.weight, lin.bias, ln.weight, ln.bias)
    results = []
    for fn in (lambda: elementwise.residual_linear_norm(h, x, lin.weight, lin.bias, ln),
               lambda: (lambda y: (y, ln(y)))(h + lin(x))):
        for t in leaves:
            t.grad = None
        y, z = fn()
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + z.square().sum() / 2).backward()
        results.append([y.detach(), z.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    y, z = elementwise.residual_linear_norm(h, x, lin.weight, lin.bias, torch.nn.Identity())  # any other norm
    torch.testing.assert_close(z, h + lin(x))


@needs_kernel
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_patch_embedding_matches_projection_plus_position_under_its_mask(p):
    torch.manual_seed(7)
    lin, pos = torch.nn.Linear(16, 32), torch.nn.Parameter(torch.randn(12, 32))
    x = torch.randn(10, 200, requires_grad=True)
    patches = x.unfold(-1, 16, 16)  # [10, 12, 16], a strided view as in PatchEmbedding
    assert elementwise.patch_embedding_usable(patches, lin, pos, p)
    y = elementwise.patch_embedding(patches, lin, pos, p)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = [y.detach(), x.grad, lin.weight.grad, lin.bias.grad, pos.grad]
    kept = (y.detach() != 0).float()
    assert kept.mean().item() == pytest.approx(1 - p, abs=0.03)
    x.grad = lin.weight.grad = lin.bias.grad = pos.grad = None
    ref = (lin(patches) + pos) * kept / (1 - p)  # the same mask: its backward must have applied it too
    ref.backward(grad)
    for a, b in zip(got, [ref.detach(), x.grad, lin.weight.grad, lin.bias.grad, pos.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_hashed_dropout_masks_are_independent_of_each_other_and_of_position():
    torch.manual_seed(5)
    a, b = (elementwise.dropout(torch.ones(256, 1024), 0.5) > 0 for _ in range(2))
    assert a.float().mean().item() == pytest.approx(0.5, abs=4e-3)
    assert (a == b).float().mean().item() == pytest.approx(0.5, abs=4e-3)  # two calls: unrelated masks
    rows, cols = a.float().mean(1), a.float().mean(0)  # no structure along either axis
    assert rows.std().item() < 0.05 and cols.std().item() < 0.05
    assert (a[:, 1:] == a[:, :-1]).float().mean().item() == pytest.approx(0.5, abs=4e-3)  # neighbours independent


def test_kernels_build_wherever_a_compiler_is_found():
    # the kernel tests skip on machines without a compiler; where there is one, a failed build is a failure
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    for name in ("attention", "elementwise"):
        assert build.compile_library(name).exists()
        assert build.load(name) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_faulting_pages_in_again():
    import resource

    assert memory.keep_freed_memory()
    faults = []
    for _ in range(6):  # a step's pattern: the same large tensors allocated and freed again and again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = torch.ones(12 * 2 ** 20), torch.ones(4 * 2 ** 20)  # 48 + 16 MB: 16,384 pages
        del a, b
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(faults[-2:]) < 1000, faults  # glibc's defaults: ~16,000 each time (mmap'ed afresh)


@needs_kernel
def test_time_vlm_computes_the_same_with_and_without_the_kernels(monkeypatch):
    """The whole model (RAL with memory bank, local block and head; the multimodal branch): the kernel paths
    and PyTorch's own give the same forecasts and gradients (dropout and head drop off, so no mask can differ)."""
    from timevlm.config import ModelConfig
    from timevlm.model.timevlm import build_model
    from timevlm.model.vlm.base import feature_dims

    cfg = ModelConfig(seq_len=96, pred_len=24, n_vars=3, periodicity=24, d_model=32, d_fusion=64, dropout=0.0,
                      mm_dropout=0.0, head_drop=0.0, memory_size=8)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    vision, text = feature_dims(cfg)
    x, y = torch.randn(4, 96, 3), torch.randn(4, 24, 3)
    feats = {"vision": torch.randn(4, cfg.vision_tokens, vision), "text": torch.randn(4, 1, text)}
    with torch.no_grad():  # open the zero-initialised outputs (flatten head, multimodal) so they reach the forecast
        model.ral.head[-1].weight.normal_(0, 0.1)
        model.multimodal.correction[-1].weight.normal_(0, 0.1)
    model(x, feats)  # the memory bank's first batch fills its slots
    slots = model.ral.memory.slots.clone()
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv(build.ENABLE_ENV, kernels)
        build.forget()
        model.zero_grad()
        model.ral.memory.slots.copy_(slots)  # each pass moves the slots: both start from the same ones
        out = model(x, feats)
        torch.nn.functional.mse_loss(out, y).backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    build.forget()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_build_without_a_compiler_says_why_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    build.forget()
    try:
        with caplog.at_level("INFO", logger="timevlm.kernels.build"), warnings.catch_warnings():
            warnings.simplefilter("error")  # by default no console warning, only a log record
            assert build.load("attention") is None
            assert build.load("attention") is None  # cached: said once
        assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()] == [
            "timevlm: the C++ kernel 'attention' is unavailable, PyTorch's own path runs instead: "
            "Command '['/bin/false', '--version']' returned non-zero exit status 1."]
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
        build.forget()
        monkeypatch.setenv(build.ENABLE_ENV, "1")  # asked for explicitly: a warning
        with pytest.warns(RuntimeWarning, match="PyTorch's own path runs instead"):
            assert build.load("attention") is None
        assert not attention.usable(torch.zeros(1, 1, 3), 1)
    finally:
        build.forget()


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(build.ENABLE_ENV, "0")
    build.forget()
    try:
        assert not attention.usable(torch.zeros(1, 1, 3), 1)
        assert not elementwise.linear_relu_usable(torch.zeros(2, 4), torch.nn.Linear(4, 4))
        from timevlm.model.layers import multihead_attention

        from timevlm.model.layers import Dropout

        attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(multihead_attention(attn, x, x), attn(x, x, x, need_weights=False)[0])
        y = Dropout(0.25).train()(torch.ones(500, 400))  # NumPy's mask instead of the hashed one
        assert (y > 0).float().mean().item() == pytest.approx(0.75, abs=4e-3)
        assert torch.unique(y).tolist() == [0.0, pytest.approx(4 / 3)]
    finally:
        build.forget()


@needs_kernel
def test_compiled_library_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    first = build.compile_library("attention")
    stamp = first.stat().st_mtime_ns
    assert build.compile_library("attention") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_kernel
def test_added_flags_build_their_own_library_and_no_avx512_means_no_zmm_register(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(build.FLAGS_ENV, raising=False)
    native = build.compile_library("elementwise")
    monkeypatch.setenv(build.FLAGS_ENV, "-mno-avx512f")
    plain = build.compile_library("elementwise")
    assert plain != native and {p.name for p in tmp_path.iterdir()} == {native.name, plain.name}
    if shutil.which("objdump"):
        assert "zmm" not in subprocess.run(["objdump", "-d", str(plain)], capture_output=True, text=True).stdout

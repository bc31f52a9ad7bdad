"""CAPNet test suite: `python -m pytest -q test_capnet.py`."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capnet  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# -----------------------------------------------------------------------------
# tokenizer, CLIP, loading, transforms

# -----------------------------------------------------------------------------
# model, graph, GCN, prompts, losses, metrics

# -----------------------------------------------------------------------------
# fused ops and the extension

import shutil  # noqa: E402  (kept in this section: fewer merge conflicts in the header)
import subprocess  # noqa: E402

needs_ext = pytest.mark.skipif(not capnet.EXT_AVAILABLE,
                               reason="capnet_ext not built (python setup.py build_ext --inplace)")
FUSED_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and capnet.EXT_CUDA), reason="no GPU or capnet_ext built without CUDA"))]
REPO = Path(__file__).resolve().parent


def _close(got, want, rtol):
    # relative to each element and to the tensor's scale (near-zero elements of a large tensor)
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


def _db_case(B, C, dtype, device, seed, logit_scale=3.0, empty_rows=(0,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, generator=g, dtype=torch.float64) * logit_scale).to(dtype)
    targets = (torch.rand(B, C, generator=g) < 0.3).to(dtype)
    for r in empty_rows:
        if r < B:
            targets[r] = 0                                    # a row with no positive label
    counts = torch.randint(1, 300, (C,), generator=g).to(torch.float64)
    weight = (C * torch.softmax(-counts.log() / 4, 0)).to(dtype)
    return logits.to(device), targets.to(device), counts.to(device), 400, weight.to(device)


def _db_both(logits, targets, counts, N, reduction="mean", **kw):
    """(loss, dloss/dlogits) of the extension and of the reference on the same upstream grad."""
    out = []
    for backend in ("ext", "torch"):
        z = logits.clone().requires_grad_()
        loss = capnet.db_focal_loss(z, targets, counts, N, reduction=reduction, backend=backend, **kw)
        upstream = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        loss.backward(upstream)
        out.append((loss.detach(), z.grad))
    return out


@needs_ext
@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_db_focal_ext_matches_reference(device, dtype, rtol):
    shapes = [(1, 1), (5, 1), (3, 7), (16, 20), (9, 80), (4, 1000), (2, 13)]
    seed = 0
    for B, C in shapes:
        for reduction in ("mean", "sum", "none"):
            for kw in (dict(), dict(gamma=1.5, lam=5.0, mu=0.3), dict(gamma=0.0, kappa=0.0), dict(class_weight=True)):
                seed += 1
                logits, targets, counts, N, weight = _db_case(B, C, dtype, device, seed)
                if kw.get("class_weight"):
                    kw = dict(class_weight=weight)
                (l_ext, g_ext), (l_ref, g_ref) = _db_both(logits, targets, counts, N, reduction, **kw)
                assert l_ext.dtype == l_ref.dtype == dtype and l_ext.shape == l_ref.shape
                _close(l_ext, l_ref, rtol)
                _close(g_ext, g_ref, rtol)


@needs_ext
@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_db_focal_ext_large_logits_finite(device, dtype, rtol):
    # |logits| up to 1e4: every element saturates; the loss and its gradient stay finite
    logits, targets, counts, N, _ = _db_case(8, 33, dtype, device, seed=7, logit_scale=1.0)
    logits = torch.sign(logits) * torch.logspace(0, 4, 8 * 33, dtype=dtype, device=device).reshape(8, 33)
    for reduction in ("none", "mean"):
        (l_ext, g_ext), (l_ref, g_ref) = _db_both(logits, targets, counts, N, reduction)
        assert torch.isfinite(l_ext).all() and torch.isfinite(g_ext).all()
        _close(l_ext, l_ref, rtol)
        _close(g_ext, g_ref, rtol)


@needs_ext
def test_db_focal_ext_rows_without_positives_use_alpha_plus_one():
    # with no positive label in the whole batch every weight is alpha + 1 (SPEC section 3)
    z = torch.randn(4, 6, dtype=torch.float64)
    y = torch.zeros(4, 6, dtype=torch.float64)
    n = torch.tensor([5.0, 9, 20, 40, 80, 3], dtype=torch.float64)
    for a in (0.1, 0.5):
        l1 = capnet.db_focal_loss(z, y, n, 100, alpha=a, reduction="none", backend="ext")
        l0 = capnet.db_focal_loss(z, y, n, 100, alpha=0.0, reduction="none", backend="ext")
        torch.testing.assert_close(l1, l0 * (a + 1.0), rtol=1e-12, atol=0)


@needs_ext
def test_db_focal_ext_half_types_computed_in_float32():
    logits, targets, counts, N, _ = _db_case(6, 20, torch.float32, "cpu", seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        z = logits.to(dtype)
        l_ext = capnet.db_focal_loss(z, targets.to(dtype), counts, N, reduction="none", backend="ext")
        l_ref = capnet.db_focal_loss_reference(z, targets.to(dtype), counts, N, reduction="none")
        assert l_ext.dtype == dtype
        # both compute in float32 and round once: at most one rounding step apart
        torch.testing.assert_close(l_ext.float(), l_ref.float(), rtol=1e-2, atol=1e-3)


@needs_ext
def test_db_focal_ext_gradcheck_and_deterministic():
    logits, targets, counts, N, weight = _db_case(3, 5, torch.float64, "cpu", seed=11)
    for reduction in ("mean", "none"):
        f = lambda z: capnet.db_focal_loss(z, targets, counts, N, class_weight=weight,
                                           reduction=reduction, gamma=2.5, backend="ext")
        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),))
    big = _db_case(64, 80, torch.float32, "cpu", seed=12)
    a = capnet.db_focal_loss(*big[:4], backend="ext")
    b = capnet.db_focal_loss(*big[:4], backend="ext")
    assert torch.equal(a, b)                                  # fixed summation order, no atomics


@needs_ext
def test_db_focal_never_mutates_inputs():
    logits, targets, counts, N, weight = _db_case(7, 9, torch.float32, "cpu", seed=5)
    before = [t.clone() for t in (logits, targets, counts, weight)]
    for backend in ("ext", "torch"):
        z = logits.clone().requires_grad_()
        z0 = z.detach().clone()
        capnet.db_focal_loss(z, targets, counts, N, class_weight=weight, backend=backend).backward()
        assert torch.equal(z.detach(), z0)
        for t, t0 in zip((logits, targets, counts, weight), before):
            assert torch.equal(t, t0)


def _graph_case(C, Din, Dout, dtype, device, seed, adj_grad=False):
    g = torch.Generator().manual_seed(seed)
    adj = torch.rand(C, C, generator=g, dtype=torch.float64)
    adj = adj / adj.sum(1, keepdim=True)
    x = torch.randn(C, Din, generator=g, dtype=torch.float64)
    w = torch.randn(Din, Dout, generator=g, dtype=torch.float64) / Din ** 0.5
    return [t.to(dtype).to(device).requires_grad_(req) for t, req in ((adj, adj_grad), (x, True), (w, True))]


@needs_ext
@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_graph_propagate_ext_matches_reference(device, dtype, rtol):
    seed = 0
    for C, Din, Dout in [(1, 1, 1), (1, 8, 3), (5, 4, 6), (20, 32, 32), (80, 64, 48)]:
        for kw in (dict(), dict(negative_slope=0.0), dict(negative_slope=0.5), dict(activation=False)):
            seed += 1
            results = []
            for backend in ("ext", "torch"):
                adj, x, w = _graph_case(C, Din, Dout, dtype, device, seed, adj_grad=(seed % 2 == 0))
                out = capnet.graph_propagate(adj, x, w, backend=backend, **kw)
                upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64).to(dtype).to(device)
                out.backward(upstream)
                results.append([out.detach(), x.grad, w.grad] + ([adj.grad] if adj.requires_grad else []))
            for got, want in zip(*results):
                _close(got, want, rtol)


@needs_ext
def test_graph_propagate_ext_gradcheck_noncontiguous_and_compile_safe():
    for activation in (True, False):
        adj, x, w = _graph_case(4, 3, 5, torch.float64, "cpu", seed=21, adj_grad=True)
        f = lambda a, b, c: capnet.graph_propagate(a, b, c, activation=activation, backend="ext")
        assert torch.autograd.gradcheck(f, (adj, x, w))
    # a transposed (non-contiguous) x gives the reference's values and gradients
    adj, x, w = _graph_case(6, 6, 4, torch.float64, "cpu", seed=22)
    xt = x.detach().t().clone().t().requires_grad_()          # same values, column-major
    out = capnet.graph_propagate(adj, xt, w, backend="ext")
    ref = capnet.graph_propagate_reference(adj, x, w)
    _close(out, ref, 1e-10)


@needs_ext
def test_fused_ops_pass_opcheck():
    logits, targets, counts, N, weight = _db_case(4, 6, torch.float32, "cpu", seed=31)
    z = logits.clone().requires_grad_()
    for cw, red in ((weight, 1), (None, 0)):
        torch.library.opcheck(torch.ops.capnet.db_focal_loss.default,
                              (z, targets, counts, float(N), 0.1, 10.0, 0.2, 0.05, 2.0, 2.0, 2.0, cw, red, True))
    adj, x, w = _graph_case(5, 4, 3, torch.float32, "cpu", seed=32, adj_grad=True)
    torch.library.opcheck(torch.ops.capnet.graph_propagate.default, (adj, x, w, 0.2, True))
    with torch.no_grad():
        out, h = torch.ops.capnet.graph_propagate(adj, x, w, 0.2, True)
    torch.library.opcheck(torch.ops.capnet.graph_propagate_backward.default,
                          (torch.randn(5, 3), adj.detach(), x.detach(), w.detach(), h, out, 0.2, True, [True, False, True]))


@needs_ext
def test_fused_ops_bad_input_clear_errors():
    logits, targets, counts, N, _ = _db_case(3, 4, torch.float32, "cpu", seed=41)
    for backend in ("ext", "torch"):
        with pytest.raises((RuntimeError, ValueError), match="targets shape"):
            capnet.db_focal_loss(logits, targets[:, :3], counts, N, backend=backend)
        with pytest.raises((RuntimeError, ValueError), match=r"class_freq must have shape \(C,\)"):
            capnet.db_focal_loss(logits, targets, counts[:3], N, backend=backend)
        with pytest.raises((RuntimeError, ValueError), match="class 2 has training count 0"):
            capnet.db_focal_loss(logits, targets, torch.tensor([1.0, 2, 0, 4]), N, backend=backend)
        with pytest.raises((RuntimeError, ValueError), match="targets must be 0 or 1"):
            capnet.db_focal_loss(logits, targets * 0.5 + 0.25, counts, N, backend=backend)
        with pytest.raises((RuntimeError, ValueError), match="logits must be"):
            capnet.db_focal_loss(logits[0], targets[0], counts, N, backend=backend)
        with pytest.raises(ValueError, match="reduction must be one of"):
            capnet.db_focal_loss(logits, targets, counts, N, reduction="avg", backend=backend)
        adj, x, w = _graph_case(4, 3, 2, torch.float32, "cpu", seed=42)
        with pytest.raises((RuntimeError, ValueError), match="adj must be square"):
            capnet.graph_propagate(adj[:3], x, w, backend=backend)
        with pytest.raises((RuntimeError, ValueError), match=r"weight must be \(Din, Dout\) with Din = 3"):
            capnet.graph_propagate(adj, x, w.t(), backend=backend)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        capnet.graph_propagate(adj, x, w.double(), backend="ext")
    with pytest.raises(ValueError, match="backend must be 'auto', 'ext' or 'torch'"):
        capnet.graph_propagate(adj, x, w, backend="cuda")


@pytest.mark.skipif(not (torch.cuda.is_available() and capnet.EXT_CUDA), reason="no GPU or capnet_ext built without CUDA")
def test_fused_ops_device_mismatch_clear_error():
    logits, targets, counts, N, _ = _db_case(3, 4, torch.float32, "cuda", seed=43)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        capnet.db_focal_loss(logits, targets.cpu(), counts, N, backend="ext")
    adj, x, w = _graph_case(4, 3, 2, torch.float32, "cuda", seed=44)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        capnet.graph_propagate(adj, x, w.detach().cpu(), backend="ext")


def test_backend_ext_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(capnet, "EXT_AVAILABLE", False)
    monkeypatch.setattr(capnet, "_EXT_WHY_NOT", "not built")
    z, y, n, N, _ = _db_case(2, 3, torch.float64, "cpu", seed=51)
    with pytest.raises(RuntimeError, match=r"python setup.py build_ext --inplace"):
        capnet.db_focal_loss(z, y, n, N, backend="ext")
    # auto quietly takes the reference
    torch.testing.assert_close(capnet.db_focal_loss(z, y, n, N), capnet.db_focal_loss_reference(z, y, n, N))


def test_import_without_extension_says_so_once():
    env = dict(os.environ, CAPNET_NO_EXT="1")
    code = ("import capnet, torch; print(capnet.EXT_AVAILABLE); "
            "a = torch.eye(3); print(capnet.graph_propagate(a, a, a).sum().item())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "3.0"]
    lines = [l for l in r.stderr.splitlines() if "capnet_ext" in l]
    assert len(lines) == 1 and "pure-torch path" in lines[0] and "python setup.py build_ext --inplace" in lines[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_compile_with_plain_nvcc(tmp_path):
    # the .cu is torch-free, so the CUDA kernels cannot rot on GPU-less machines (SPEC section 4)
    r = subprocess.run(["nvcc", "-c", "-O3", str(REPO / "csrc" / "capnet_kernels.cu"), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "k.o").stat().st_size > 0

# -----------------------------------------------------------------------------
# data preparation and datasets

# -----------------------------------------------------------------------------
# synthetic-lt

# -----------------------------------------------------------------------------
# train, eval, predict, CLI, faults

# -----------------------------------------------------------------------------
# bench

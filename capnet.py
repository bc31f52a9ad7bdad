"""
CAPNet: correlation adaptation prompt network for long-tailed multi-label recognition.

A single-file reference implementation (arXiv 2511.20641): CLIP with class-specific soft
prompts, a three-layer residual GCN over a label graph taken from CLIP's text encoder, a
distribution-balanced focal loss with class-aware re-weighting, AdaptFormer (ViT) or bias
tuning (ResNet), and five-crop test-time ensembling.

The file reads top to bottom in the order data flows:
config -> tokenizer -> CLIP -> transforms -> data -> graph, GCN, prompts, model -> loss ->
metrics -> fused-op dispatch -> train -> eval -> bench -> CLI.

Choices and assumptions (the paper publishes no code; defaults follow its closest ancestors):
see README.md, "Choices and assumptions".
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    # data and backbone
    data: str = "synthetic-lt"        # dataset name: data/<data>/dataset.json
    data_root: str = "data"           # folder holding the prepared datasets
    clip: str = ""                    # CLIP model name or checkpoint path ("" = preset's)
    name: str = ""                    # run name -> runs/<name>/ ("" = derived from data and clip)
    out_dir: str = "runs"             # folder of all runs
    # prompts (section 1 step 2)
    n_ctx: int = 16                   # M, learnable context vectors per class
    ctx_init: str = ""                # "" = N(0, 0.02^2) init; else a template, e.g. "a photo of a"
    # label graph and GCN (steps 3, 4)
    graph: str = "text"               # text | cooccur | identity
    s: float = 10.0                   # s, sharpness of the text-similarity softmax
    p: float = 0.2                    # p, neighbour weight in P = (1 - p) I + p A
    cooccur_threshold: float = 0.4    # ML-GCN binarisation threshold of P(j|i) (graph=cooccur)
    negative_slope: float = 0.2       # LeakyReLU slope between GCN layers
    # PEFT (step 5)
    peft: str = "adaptformer"         # adaptformer (ViT) / bias tuning (ResNet) | none
    adapter_dim: int = 0              # r, AdaptFormer bottleneck (0 = LIFT rule)
    # loss (section 3)
    loss: str = "db-focal"            # db-focal | bce | focal
    alpha: float = 0.1                # alpha, rebalance weight floor
    beta: float = 10.0                # beta, rebalance sigmoid steepness
    mu: float = 0.2                   # mu, rebalance sigmoid centre
    kappa: float = 0.05               # kappa, NTR bias scale
    lam: float = 2.0                  # lambda, NTR negative-logit scale
    gamma: float = 2.0                # gamma, focal exponent
    balance: float = 2.0              # overall loss scale of the DB-focal term
    tau_prime: float = 4.0            # tau', class-aware re-weighting temperature (inf = off)
    # optimisation (section 6)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4        # not on the temperature and adapter scales
    warmup_epochs: float = 1.0
    # images
    input_size: int = 224             # crop size fed to the image tower
    scale_min: float = 0.5            # random resized crop scale range (scale_min, 1)
    tte: int = 5                      # test-time views: 1 | 5 | 10
    eval_batch_size: int = 64
    # runtime
    device: str = "auto"              # auto | cpu | cuda
    amp: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | bf16 | none
    backend: str = "auto"             # fused ops: auto | ext | torch
    compile: bool = False             # torch.compile the model
    workers: int = 2                  # DataLoader worker processes
    seed: int = 0
    seeds: str = ""                   # e.g. "0,1,2": one run per seed, mean and std reported
    log_every: int = 10               # steps between progress lines
    skip_bad_images: bool = False     # count and skip unreadable images instead of failing
    resume: bool = False              # continue runs/<name>/ from its checkpoint


# per-benchmark presets: only what differs from the Config defaults
PRESETS = {
    "synthetic-lt": dict(),
    "voc-lt": dict(clip="ViT-B/16", mu=0.3, lam=5.0),
    "coco-lt": dict(clip="ViT-B/16"),
    "nus-wide-lt": dict(clip="ViT-B/16"),
}

# -----------------------------------------------------------------------------
# tokenizer

# -----------------------------------------------------------------------------
# CLIP

# -----------------------------------------------------------------------------
# image transforms

# -----------------------------------------------------------------------------
# data

# -----------------------------------------------------------------------------
# label graph, GCN, prompt learner, CAPNet

# -----------------------------------------------------------------------------
# losses

# -----------------------------------------------------------------------------
# metrics

# -----------------------------------------------------------------------------
# fused-op dispatch (pure-torch references beside their dispatchers)

# The two hot custom ops of CAPNet: the DB-focal loss (section 1 step 7) and one GCN layer's
# propagation (step 4). Each has a readable pure-torch reference, which is the specification
# (SPEC section 3), and a dispatcher that runs the fused C++/CUDA kernels of csrc/ (the
# `capnet_ext` extension, torch.ops.capnet.*) when they are built, else the reference.
# backend: "auto" (extension when built and it has a kernel for the tensor's device),
# "ext" (error if unavailable) or "torch" (always the reference).

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _check_db_focal_args(logits, targets, class_freq, num_images, class_weight, reduction):
    # clear errors for bad input; the kernels check the same things in C++
    if reduction not in _REDUCTIONS:
        raise ValueError(f"db_focal_loss: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"db_focal_loss: logits must be a 2-D (B, C) floating tensor, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if targets.shape != logits.shape:
        raise ValueError(f"db_focal_loss: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"{tuple(logits.shape)}")
    if ((targets != 0) & (targets != 1)).any():
        raise ValueError("db_focal_loss: targets must be 0 or 1")
    C = logits.shape[1]
    if class_freq.shape != (C,):
        raise ValueError(f"db_focal_loss: class_freq must have shape (C,) = ({C},), got {tuple(class_freq.shape)}")
    bad = ((class_freq <= 0) | (class_freq >= num_images)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"db_focal_loss: class {bad[0]} has training count {class_freq[bad[0]].item()}; "
                         f"the DB loss needs 0 < n_c < num_images ({num_images})")
    if class_weight is not None and class_weight.shape != (C,):
        raise ValueError(f"db_focal_loss: class_weight must have shape (C,) = ({C},), got {tuple(class_weight.shape)}")


def db_focal_loss_reference(logits, targets, class_freq, num_images, *, alpha=0.1, beta=10.0,
                            mu=0.2, kappa=0.05, lam=2.0, gamma=2.0, balance=2.0,
                            class_weight=None, reduction="mean"):
    """Distribution-balanced focal loss with negative-tolerant regularisation (SPEC section 3;
    Wu et al. 2020, "Distribution-Balanced Loss for Multi-Label Classification in Long-Tailed
    Datasets", eqs. 3-6, with the focal factor of its released code). logits, targets: (B, C);
    class_freq: (C,) training counts n_c; num_images: N. Half types are computed in float32."""
    class_freq = torch.as_tensor(class_freq, device=logits.device)
    _check_db_focal_args(logits, targets, class_freq, num_images, class_weight, reduction)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)                                   # (B, C); .to never writes to the caller's tensor
    y = targets.to(dtype)                                  # (B, C) in {0, 1}
    n = class_freq.to(dtype)                               # (C,)
    # rebalance: r_bc = (1/n_c) / sum_k y_bk / n_k, w = alpha + sigmoid(beta (r - mu))
    inv_n = 1.0 / n                                        # (C,)
    row = (y * inv_n).sum(1, keepdim=True)                 # (B, 1)
    r = inv_n / row                                        # (B, C), inf on a row with no positive
    w = torch.where(row > 0, alpha + torch.sigmoid(beta * (r - mu)), alpha + 1.0)  # (B, C); r -> inf limit
    # negative-tolerant regularisation: class-specific bias, negatives' logits scaled by lam
    bias = -kappa / lam * torch.log(num_images / n - 1.0)  # (C,)
    zb = z + bias                                          # (B, C)
    pos = y > 0
    z2 = torch.where(pos, zb, lam * zb)                    # (B, C)
    w2 = torch.where(pos, w, w / lam)                      # (B, C)
    # focal term on the elementwise BCE
    # BCEWithLogits(z'', y) written out in its stable form: F.binary_cross_entropy_with_logits takes
    # log(1 + tiny) without log1p, which loses all relative precision of a near-zero bce
    bce = z2.clamp(min=0) - z2 * y + torch.log1p(torch.exp(-z2.abs()))  # (B, C)
    one_minus_pt = -torch.expm1(-bce)                      # 1 - p_t, p_t = exp(-bce); no cancellation as p_t -> 1
    loss = balance * one_minus_pt ** gamma * w2 * bce      # (B, C)
    if class_weight is not None:
        loss = loss * class_weight.to(dtype)               # (B, C) * (C,)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)


def graph_propagate_reference(adj, x, weight, *, negative_slope=0.2, activation=True):
    """One GCN propagation step (section 1 step 4): act(adj @ (x @ weight)), adj (C, C),
    x (C, Din), weight (Din, Dout); act is LeakyReLU(negative_slope) or the identity."""
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"graph_propagate: adj must be square (C, C), got {tuple(adj.shape)}")
    if x.dim() != 2 or x.shape[0] != adj.shape[0]:
        raise ValueError(f"graph_propagate: x must be (C, Din) with C = {adj.shape[0]}, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"graph_propagate: weight must be (Din, Dout) with Din = {x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    out = adj @ (x @ weight)                               # (C, Dout)
    return F.leaky_relu(out, negative_slope) if activation else out


def _load_extension():
    """Import capnet_ext (registers torch.ops.capnet.*); (module, "") or (None, why not)."""
    if os.environ.get("CAPNET_NO_EXT") == "1":
        return None, "disabled by CAPNET_NO_EXT=1"
    try:
        import capnet_ext
        return capnet_ext, ""
    except ModuleNotFoundError:
        pass
    except (ImportError, OSError) as e:            # e.g. built against another torch
        return None, f"import failed: {e}"
    # capnet.py imported from elsewhere: look beside it, where build_ext --inplace puts it
    import importlib.util
    for path in sorted(Path(__file__).resolve().parent.glob("capnet_ext*.so")):
        try:
            spec = importlib.util.spec_from_file_location("capnet_ext", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["capnet_ext"] = mod
            return mod, ""
        except (ImportError, OSError) as e:
            return None, f"{path.name} failed to load: {e}"
    return None, "not built"


capnet_ext, _EXT_WHY_NOT = _load_extension()
EXT_AVAILABLE = capnet_ext is not None
EXT_CUDA = EXT_AVAILABLE and bool(getattr(capnet_ext, "WITH_CUDA", False))
if not EXT_AVAILABLE:
    print(f"capnet: fused-op extension capnet_ext {_EXT_WHY_NOT}; using the pure-torch path "
          f"(build it with: python setup.py build_ext --inplace)", file=sys.stderr)


def ext_status():
    """One line for `info` and train logs: which fused-op backend runs where."""
    if not EXT_AVAILABLE:
        return f"pure torch (capnet_ext {_EXT_WHY_NOT})"
    return "capnet_ext (CPU + CUDA kernels)" if EXT_CUDA else "capnet_ext (CPU kernels)"


def _use_ext(backend, device, op):
    if backend == "torch":
        return False
    if backend not in ("auto", "ext"):
        raise ValueError(f"{op}: backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    has_kernel = EXT_AVAILABLE and (device.type == "cpu" or (device.type == "cuda" and EXT_CUDA))
    if backend == "ext" and not has_kernel:
        why = _EXT_WHY_NOT if not EXT_AVAILABLE else f"it was built without kernels for {device.type}"
        raise RuntimeError(f"{op}: backend='ext' but capnet_ext cannot run here ({why}); "
                           f"build it with: python setup.py build_ext --inplace, or use backend='torch'")
    return has_kernel


def db_focal_loss(logits, targets, class_freq, num_images, *, alpha=0.1, beta=10.0, mu=0.2,
                  kappa=0.05, lam=2.0, gamma=2.0, balance=2.0, class_weight=None,
                  reduction="mean", backend="auto"):
    """db_focal_loss_reference, fused: one pass per row computes the loss and its gradient."""
    cw_grad = class_weight is not None and class_weight.requires_grad
    if cw_grad or not _use_ext(backend, logits.device, "db_focal_loss"):
        # the kernel differentiates w.r.t. logits only; a trainable class_weight takes the reference
        if cw_grad and backend == "ext":
            raise RuntimeError("db_focal_loss: backend='ext' differentiates w.r.t. logits only, "
                               "but class_weight requires grad")
        return db_focal_loss_reference(logits, targets, class_freq, num_images, alpha=alpha, beta=beta,
                                       mu=mu, kappa=kappa, lam=lam, gamma=gamma, balance=balance,
                                       class_weight=class_weight, reduction=reduction)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"db_focal_loss: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    class_freq = torch.as_tensor(class_freq, device=logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.capnet.db_focal_loss(
        logits, targets, class_freq, float(num_images), float(alpha), float(beta), float(mu),
        float(kappa), float(lam), float(gamma), float(balance), class_weight,
        _REDUCTIONS[reduction], compute_grad)
    return loss


def graph_propagate(adj, x, weight, *, negative_slope=0.2, activation=True, backend="auto"):
    """graph_propagate_reference, fused: ATen GEMMs with the LeakyReLU in the epilogue."""
    # the kernel's backward reads the activation's sign from its output, exact for slope >= 0
    if negative_slope < 0 or not _use_ext(backend, x.device, "graph_propagate"):
        if negative_slope < 0 and backend == "ext":
            raise RuntimeError(f"graph_propagate: backend='ext' needs negative_slope >= 0, got {negative_slope}")
        return graph_propagate_reference(adj, x, weight, negative_slope=negative_slope, activation=activation)
    out, _ = torch.ops.capnet.graph_propagate(adj, x, weight, float(negative_slope), bool(activation))
    return out


# Autograd of both ops is registered in C++ (csrc/capnet_ops.cpp; a Python register_autograd
# round trip cost as much as the fused loss itself); the fake (meta) kernels that let
# torch.compile and torch.library.opcheck trace them are registered here, the same way for both.
if EXT_AVAILABLE:
    @torch.library.register_fake("capnet::db_focal_loss")
    def _db_focal_loss_fake(logits, targets, class_freq, num_images, alpha, beta, mu, kappa, lam,
                            gamma, balance, class_weight, reduction, compute_grad):
        loss = logits.new_empty(logits.shape if reduction == 0 else ())
        return loss, logits.new_empty(logits.shape if compute_grad else (0,))

    @torch.library.register_fake("capnet::graph_propagate")
    def _graph_propagate_fake(adj, x, weight, negative_slope, activation):
        return x.new_empty(x.shape[0], weight.shape[1]), x.new_empty(x.shape[0], weight.shape[1])

    @torch.library.register_fake("capnet::graph_propagate_backward")
    def _graph_propagate_backward_fake(grad_out, adj, x, weight, h, out, negative_slope, activation,
                                       output_mask):
        shapes = (adj.shape, x.shape, weight.shape)
        return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


# -----------------------------------------------------------------------------
# train

# -----------------------------------------------------------------------------
# eval and predict

# -----------------------------------------------------------------------------
# bench

# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    main()

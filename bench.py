"""
bench.py: the speed harness of CAPNet (results and targets: docs/speed.md).

    python bench.py [--quick] [--json out.json]
    python bench.py --check      (also `python capnet.py check`: correctness on every device, no timing)

Every row times a baseline and a fast path side by side in this one process: warm-up first,
then rounds that alternate the variants (so a load spike on the shared machine hits both),
and the median over rounds. ratio = baseline_ms / fast_ms; max_abs_diff compares outputs.
--quick runs the same code on toy layouts in seconds (the test suite does).
"""
import argparse
import datetime
import functools
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

import capnet
from capnet import (CLIP, Config, EXT_AVAILABLE, class_aware_weights, db_focal_loss,
                    db_focal_loss_reference, graph_propagate, graph_propagate_reference,
                    make_criterion, tokenize)
from data_prep import init_clip_like_openai  # OpenAI's from-scratch initialisation, for random weights

BENCH_VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12)
BENCH_RN50 = dict(BENCH_VIT_B16, embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64,
                  vision_patch_size=None)
# --quick: the same code on toy layouts, small enough for the test suite
BENCH_TINY_VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, context_length=77, vocab_size=49408,
                      transformer_width=64, transformer_heads=2, transformer_layers=2)
BENCH_TINY_RN = dict(BENCH_TINY_VIT, embed_dim=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                     vision_patch_size=None)


def _time_variants(fns, warmup, repeats, device, target_ms=None, rounds=None):
    """fns: {name: fn}. Returns ({name: median ms per call}, {name: output of its first call}).
    target_ms: call a tiny op as often as makes one sample last about that long (timer noise);
    rounds: {name: n} times a variant in the first n rounds only."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(fn, n=1):  # ms per call, and the first call's output
        sync()
        t0 = time.perf_counter()
        out = fn()
        for _ in range(n - 1):
            fn()
        sync()
        return (time.perf_counter() - t0) * 1e3 / n, out
    inner = 1
    if target_ms:  # calibrated on one call of the first variant
        inner = max(1, min(1000, int(target_ms / max(timed(next(iter(fns.values())))[0], 1e-3))))
    outs, samples = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs.setdefault(name, fn())
    for i in range(repeats):
        for name, fn in fns.items():  # interleaved: a, b, a, b, ... so load drift hits all alike
            if i < (rounds or {}).get(name, repeats):
                ms, out = timed(fn, inner)
                samples[name].append(ms)
                outs.setdefault(name, out)
    return {name: float(np.median(s)) for name, s in samples.items()}, outs


def _max_abs_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(_max_abs_diff(x, y) for x, y in zip(a, b))
    return float((a.detach().double() - b.detach().double()).abs().max())


def _row(name, baseline_ms, fast_ms, max_abs_diff, note=""):
    sig = lambda x: float(f"{x:.6g}")  # 6 significant digits in the JSON
    return {"name": name, "baseline_ms": sig(baseline_ms), "fast_ms": sig(fast_ms),
            "ratio": sig(baseline_ms / fast_ms), "max_abs_diff": max_abs_diff, "note": note}


def _compare(name, baseline, fast, device, warmup, repeats, note="", target_ms=None):
    # the usual row: two variants timed side by side, their outputs compared
    ms, outs = _time_variants({"baseline": baseline, "fast": fast}, warmup, repeats, device, target_ms)
    return _row(name, ms["baseline"], ms["fast"], _max_abs_diff(outs["baseline"], outs["fast"]), note)


def _fwd_bwd(fn, *leaves):
    # one timed step: forward, backward, and the output and input gradients to compare
    def step():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        return (out.detach(), *[t.grad.detach().clone() for t in leaves])
    return step


def _vit_forward_flops(visual, batch):
    # FLOPs (2 per multiply-add) from the shapes: per block 24 N W^2 (qkv, out proj, 4x MLP)
    # + 4 N^2 W (QK^T and AV); plus the patch conv and the final projection
    w, p, layers = visual.conv1.out_channels, visual.conv1.kernel_size[0], len(visual.transformer.resblocks)
    n_patch = (visual.input_resolution // p) ** 2
    n = n_patch + 1  # + the class token
    return batch * (2 * n_patch * 3 * p * p * w + layers * (24 * n * w * w + 4 * n * n * w)
                    + 2 * w * visual.proj.shape[1])


def _train_step_flops(model, batch):
    """FLOPs of one CAPNet train step on a ViT (GEMMs, the patch conv and the attention
    matmuls; 2 per multiply-add), from the shapes. The CLIP weights are frozen, so backward
    computes input gradients only, and only where a trainable parameter lies upstream: the
    image tower back to block 0's adapter (block 0's attention and MLP, the patch conv and
    every weight gradient but the adapters' are skipped), the text tower back to the context."""
    vis, clip, C = model.clip.visual, model.clip, len(model.classnames)
    w, r, D, layers = vis.conv1.out_channels, model.adapter_dim, clip.embed_dim, len(vis.transformer.resblocks)
    n = (vis.input_resolution // vis.conv1.kernel_size[0]) ** 2 + 1
    adapter = 4 * n * w * r                                        # down + up, forward; x2 backward
    image = _vit_forward_flops(vis, batch) + batch * layers * adapter
    image_bwd = batch * ((layers - 1) * (24 * n * w * w + 8 * n * n * w) + layers * 2 * adapter + 2 * w * D)
    tw, tl, L = clip.transformer.width, clip.transformer.layers, model.prompt_learner.token_ids.shape[1]
    text = C * (tl * (24 * L * tw * tw + 4 * L * L * tw) + 2 * tw * D)  # EOT rows only through the projection
    text_bwd = C * (tl * (24 * L * tw * tw + 8 * L * L * tw) + 2 * tw * D)
    gcn, gcn_bwd = 3 * (2 * C * D * D + 2 * C * C * D), 3 * (2 * C * C * D + 4 * C * D * D)  # W2 too
    head, head_bwd = 2 * batch * C * D, 4 * batch * C * D
    return image + image_bwd + text + text_bwd + gcn + gcn_bwd + head + head_bwd


def _eval_flops(model, n_images):
    """FLOPs of scoring n_images crops at eval: image tower with adapters and the head (the
    text side is cached)."""
    vis, C = model.clip.visual, len(model.classnames)
    w, layers = vis.conv1.out_channels, len(vis.transformer.resblocks)
    n = (vis.input_resolution // vis.conv1.kernel_size[0]) ** 2 + 1
    return _vit_forward_flops(vis, n_images) + n_images * (layers * 4 * n * w * model.adapter_dim
                                                           + 2 * C * model.clip.embed_dim)


def _bench_clip(layout, device):
    torch.manual_seed(0)
    return init_clip_like_openai(CLIP(**layout)).float().to(device).eval()  # random weights, OpenAI's init


def _bench_model(layout, n_classes, device):
    """A CAPNet on a random-weight CLIP of the given layout, with a made-up long-tailed label set."""
    clip = _bench_clip(layout, device)
    rng = np.random.default_rng(0)
    c = np.arange(n_classes)
    train_targets = (rng.random((2000, n_classes)) < 0.3 * 0.9 ** c).astype(np.float32)  # (N, C) long tail
    train_targets[c % 2000, c] = 1.0  # every class has a training image
    # short made-up names (1-3 BPE tokens each, like "traffic light"): the EOT lands where real
    # class names put it, which is what truncation depends on
    classnames = [f"thing {i}" for i in range(n_classes)]
    cfg = Config(**capnet.RECIPES["ours"]["*"])  # our recipe: 16 random context vectors, GCN width D
    model = capnet.build_model(clip, classnames, cfg, train_targets)
    return capnet.install_fast_paths(model.to(device)), train_targets


def _set_fast_paths(model, truncate=True, fused=True, new=True):
    # switches of the model's fast paths (attention: see _attention_context), through capnet's one
    # installer. fused: the GCN propagation (the loss: by its criterion); new: the elementwise and bf16
    # paths (fused QuickGELU, bf16 matmul attention on CPU); the third, the bf16-held frozen weights,
    # is switched by _BF16Weights
    capnet.install_fast_paths(model, backend="auto" if new else "torch", shortest_text_context=truncate,
                              matmul_attention_bf16_cpu=new)
    model.gcn.backend = "auto" if fused else "torch"


class _BF16Weights:
    """Both copies of the frozen GEMM weights, fp32 and bf16 (as capnet.hold_frozen_in_bf16
    makes them), swapped in by reference: switching costs nothing inside a timed step."""

    def __init__(self, clip):
        frozen = [p for p in clip.parameters() if not p.requires_grad]
        fp32 = [p.data for p in frozen]
        capnet.hold_frozen_in_bf16(clip)
        self.pairs = [(p, a, p.data) for p, a in zip(frozen, fp32) if p.dtype == torch.bfloat16]
        self.use(False)

    def use(self, bf16):
        for p, fp32, half in self.pairs:
            p.data = half if bf16 else fp32


def _attention_context(sdpa):
    # SDPA off = PyTorch's unfused math attention (Q K^T, softmax, then V), the reference
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return contextlib.nullcontext() if sdpa else sdpa_kernel(SDPBackend.MATH)


def _random_images(clip, batch, seed, device):
    size = clip.visual.input_resolution
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_note(device):
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return f"peak {mb:.0f} MB (CUDA allocated, this row)"
    return f"peak RSS {_peak_rss_mb():.0f} MB (process so far)"


def _bench_fused_rows(loss_sizes, prop_sizes, device, warmup, repeats, target_ms):
    rows = []
    g = torch.Generator().manual_seed(0)
    for b, c in loss_sizes:
        logits = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_()
        targets = (torch.rand(b, c, generator=g) < 0.1).float().to(device)
        freq = torch.randint(1, 1000, (c,), generator=g).float().to(device)
        weight = class_aware_weights(freq.cpu().numpy(), 4.0).float().to(device)  # as in training
        args = (targets, freq, 5000)
        ref = _fwd_bwd(lambda x: db_focal_loss_reference(x, *args, class_weight=weight), logits)
        fused = _fwd_bwd(lambda x: db_focal_loss(x, *args, class_weight=weight, backend="auto"), logits)
        name = "loss_fused_vs_ref" if (b, c) == (256, 80) else f"loss_fused_vs_ref_B{b}_C{c}"
        rows.append(_compare(name, ref, fused, device, warmup, repeats, "fwd+bwd", target_ms))
    for c, d in prop_sizes:
        a = torch.softmax(torch.randn(c, c, generator=g), dim=1).to(device)
        x = torch.randn(c, d, generator=g).to(device).requires_grad_()
        w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device).requires_grad_()
        ref = _fwd_bwd(lambda x, w: graph_propagate_reference(a, x, w), x, w)
        fused = _fwd_bwd(lambda x, w: graph_propagate(a, x, w, backend="auto"), x, w)
        name = "propagate_fused_vs_ref" if (c, d) == (80, 512) else f"propagate_fused_vs_ref_C{c}_D{d}"
        rows.append(_compare(name, ref, fused, device, warmup, repeats, "fwd+bwd", target_ms))
    return rows


def _bench_text_row(model, n_ctx, device, warmup, repeats):
    # prompt-learner text encoding, fwd+bwd as training runs it every step: the shortest
    # context that holds every EOT against all 77 positions
    clip, n_classes = model.clip, len(model.classnames)
    prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in model.classnames]
    tokens = tokenize(prompts).to(device)                                  # (C, 77)
    eot = tokens.argmax(dim=-1)                                            # (C,) EOT has the largest id
    x = clip.token_embedding(tokens).detach().requires_grad_()             # (C, 77, W)
    full = _fwd_bwd(lambda x: clip.encode_text_embeddings(x, eot, short_context=False), x)  # (C, D)
    truncated = _fwd_bwd(lambda x: clip.encode_text_embeddings(x, eot, short_context=True), x)
    note = f"C={n_classes}, {n_ctx} ctx tokens: {int(eot.max()) + 1} of {tokens.shape[1]} positions, fwd+bwd"
    return _compare("text_truncated_vs_full", full, truncated, device, warmup, repeats, note)


TRAIN_VARIANTS = {  # name: (truncate, sdpa, fused, bf16, new: fused QuickGELU + bf16 paths)
    "fast": (True, True, True, False, True),
    "naive": (False, False, False, False, False),
    "bf16": (True, True, True, True, True),
    "bf16_unfused": (True, True, True, True, False),  # every elementwise / bf16-weight path off
    "no_truncate": (False, True, True, False, True),
    "no_sdpa": (True, False, True, False, True),
    "no_fused": (True, True, False, False, True),
}


def _bench_train_rows(model, train_targets, tag, batch, variants, device, warmup, repeats, gemm_gflops):
    """A whole CAPNet train step (forward, DB-focal loss, backward, SGD step) per variant;
    one row for each variant other than "fast", against "fast"; and the step against the
    machine's limit: the FLOP model over the GEMM rate measured in this run (ViT only)."""
    images = _random_images(model.clip, batch, 1, device)  # (B, 3, S, S)
    targets = torch.from_numpy(train_targets[:batch]).to(device)  # (B, C)
    criteria = {fused: make_criterion(Config(backend="auto" if fused else "torch"),
                                      train_targets.sum(0), len(train_targets)) for fused in (True, False)}
    params = [p for part in model.trainable_parts().values() for p in part]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    weights = _BF16Weights(model.clip)
    model.train()

    def step(truncate, sdpa, fused, bf16, new):
        with torch.no_grad():  # every step starts from the same weights: outputs comparable
            for p, p0 in zip(params, start):
                p.copy_(p0)
        _set_fast_paths(model, truncate, fused, new)
        weights.use(bf16 and new)
        opt.zero_grad(set_to_none=True)
        with _attention_context(sdpa), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(images)  # (B, C)
        criteria[fused](logits.float(), targets).backward()  # loss in fp32, as in training
        opt.step()
        return logits.detach().float()
    fns = {v: functools.partial(step, *TRAIN_VARIANTS[v]) for v in variants}
    for _ in range(warmup):  # one step warms every variant's kernels alike: a ~20 s step has no JIT
        fns["fast"]()
    # the one-path-off variants get one round each (a ViT-B/16 step is ~20 s on 2 cores)
    ablations = {v: 1 for v in variants if v.startswith("no_")}
    ms, outs = _time_variants(fns, 0, repeats, device, rounds=ablations)
    _set_fast_paths(model)
    weights.use(False)
    ips = lambda v: f"{batch / ms[v] * 1e3:.2f}"
    peak = _peak_note(device)
    rows = []
    for v in variants[1:]:  # variants[0] is "fast"
        if v == "naive":
            note = f"C={len(model.classnames)}, batch {batch}, fp32: {ips('fast')} vs {ips(v)} img/s; {peak}"
        elif v == "bf16":
            note = (f"bf16 autocast, all fast paths on: {ips(v)} vs {ips('fast')} img/s; "
                    "diff = logits, bf16 rounding")
        elif v == "bf16_unfused":
            note = (f"bf16, fused QuickGELU + bf16-held weights + matmul attention on vs off: "
                    f"{ips('bf16')} vs {ips(v)} img/s")
        else:
            note = f"one fast path off, batch {batch}, fp32, 1 sample"
        base, fast = {"bf16": ("fast", "bf16"), "bf16_unfused": (v, "bf16")}.get(v, (v, "fast"))
        name = {"bf16": "train_step_bf16_vs_fp32", "bf16_unfused": "train_step_bf16_fused_vs_unfused"}.get(
            v, f"train_step_fast_vs_{v}")
        rows.append(_row(name + tag, ms[base], ms[fast], _max_abs_diff(outs[base], outs[fast]), note))
    if isinstance(model.clip.visual, capnet.VisionTransformer):
        flops = _train_step_flops(model, batch)
        for kind, v in (("fp32", "fast"), ("bf16", "bf16")):
            if v in ms:  # ratio = (FLOPs / GEMM rate) / step time: the fraction of the GEMM-bound limit
                ideal_ms = flops / (gemm_gflops[kind] * 1e9) * 1e3
                rows.append(_row(f"train_step_roofline_{kind}{tag}", ideal_ms, ms[v], None,
                                 f"{flops / 1e12:.3f} TFLOP per step at the {kind} GEMM rate "
                                 f"{gemm_gflops[kind]:.0f} GFLOP/s; ratio = fraction of that limit"))
    return rows


def _bench_eval_row(model, tag, batch, n_views, device, warmup, repeats):
    # TTE eval: batch x n_views crops through the image tower, logits averaged over views;
    # F_hat (text tower + GCN) cached once vs recomputed for every batch
    C = len(model.classnames)
    views = _random_images(model.clip, batch * n_views, 2, device)  # (B*V, 3, S, S)
    model.eval()
    cached = lambda: model(views).view(batch, n_views, C).mean(dim=1)  # (B, C)

    def uncached():
        model._text_cache = None  # what an uncached eval recomputes per batch
        return cached()
    with torch.no_grad():
        row = _compare(f"eval_tte_cached_vs_uncached{tag}", uncached, cached, device, warmup, repeats)
    ips = lambda ms: f"{batch / ms * 1e3:.2f}"
    row["note"] = (f"C={C}, {batch} images x {n_views} views: {ips(row['fast_ms'])} vs "
                   f"{ips(row['baseline_ms'])} img/s; {_peak_note(device)}")
    return row


def _bench_eval_bf16_row(model, tag, batch, n_views, device, warmup, repeats, gemm_gflops):
    # TTE eval in bf16 (frozen weights held in bf16, every fast path on) against the bf16 GEMM limit
    views = _random_images(model.clip, batch * n_views, 2, device)  # (B*V, 3, S, S)
    weights = _BF16Weights(model.clip)
    weights.use(True)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        ms, _ = _time_variants({"bf16": lambda: model(views)}, warmup, repeats, device)
    weights.use(False)
    ideal_ms = _eval_flops(model, batch * n_views) / (gemm_gflops["bf16"] * 1e9) * 1e3
    return _row(f"eval_tte_roofline_bf16{tag}", ideal_ms, ms["bf16"], None,
                f"{batch} images x {n_views} views: {batch / ms['bf16'] * 1e3:.2f} img/s; "
                f"ratio = fraction of the bf16 GEMM limit")


def _bench_attention_bf16_row(batch, heads, n, d, device, warmup, repeats):
    # one attention layer, fwd+bwd in bf16: SDPA (flash on CPU) vs capnet.matmul_attention
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    sdpa = _fwd_bwd(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), q, k, v)
    ours = _fwd_bwd(capnet.matmul_attention, q, k, v)
    return _compare("attention_bf16_ours_vs_sdpa", sdpa, ours, device, warmup, repeats,
                    f"fwd+bwd, B={batch}, {heads} heads, L={n}, d={d}; diff: bf16 rounding")


def _bench_first_use_row(model, train_targets, batch, device, warmup, repeats):
    """The first-use checks of the three fused ops (capnet.compare_with_reference, run once per process, op, device
    and dtype) at the inputs a train step of this model gives them, against one train step."""
    C, D = model.gcn.P.shape[0], model.clip.embed_dim
    g = torch.Generator().manual_seed(9)
    targets = torch.from_numpy(train_targets[:batch]).to(device)  # (B, C)
    loss_pair = capnet.db_focal_pair(targets, torch.as_tensor(train_targets.sum(0)).to(device), len(train_targets))
    checks = [(*loss_pair, [torch.randn(batch, C, generator=g).to(device)], True),
              (*capnet.propagate_pair(), [model.gcn.P, torch.randn(C, D, generator=g).to(device), model.gcn.W0], False),
              (torch.ops.capnet.quick_gelu if EXT_AVAILABLE else capnet.quick_gelu_reference,
               capnet.quick_gelu_reference, [torch.randn(1 << 16, generator=g).to(device)], True)]
    images = _random_images(model.clip, batch, 1, device)
    crit = make_criterion(Config(), train_targets.sum(0), len(train_targets))
    opt = torch.optim.SGD([p for part in model.trainable_parts().values() for p in part], lr=0.0)  # lr 0: no drift

    def step():
        opt.zero_grad(set_to_none=True)
        crit(model(images).float(), targets).backward()
        opt.step()
    model.train()
    fns = {"step": step, "checks": lambda: [capnet.compare_with_reference(*c) for c in checks]}
    ms, _ = _time_variants(fns, warmup, repeats, device)
    return _row("first_use_checks_vs_train_step", ms["step"], ms["checks"], None,
                f"all three ops' first-use checks = {ms['checks'] / ms['step']:.1%} of one train step "
                f"(C={C}, batch {batch}, fp32); they run once per process, device and dtype")


def _bench_image_rows(clip, tag, batch, n_gemm, device, warmup, repeats):
    # ViT image tower forward: SDPA vs math attention, and its FLOP rate against the fp32
    # GEMM rate measured in the same rounds (so both see the same load)
    images = _random_images(clip, batch, 3, device)
    a, b = torch.randn(2, n_gemm, n_gemm, device=device)

    def encode(sdpa):
        with _attention_context(sdpa):
            return clip.encode_image(images)  # (B, D)
    fns = {"math": lambda: encode(False), "sdpa": lambda: encode(True), "gemm": lambda: a @ b}
    with torch.no_grad():
        ms, outs = _time_variants(fns, warmup, repeats, device)
    gemm_gflops = 2 * n_gemm ** 3 / (ms["gemm"] * 1e-3) / 1e9
    flops = _vit_forward_flops(clip.visual, batch)
    ideal_ms = flops / (gemm_gflops * 1e9) * 1e3
    rate = flops / (ms["sdpa"] * 1e-3) / 1e9
    return [_row(f"attention_sdpa_vs_math{tag}", ms["math"], ms["sdpa"],
                 _max_abs_diff(outs["math"], outs["sdpa"]), f"image tower forward, batch {batch}"),
            _row(f"image_fwd_vs_gemm_rate{tag}", ideal_ms, ms["sdpa"], None,
                 f"ratio = fraction of the fp32 GEMM rate ({n_gemm}^3): {rate:.2f} of {gemm_gflops:.2f} "
                 f"GFLOP/s ({flops / batch / 1e9:.3f} GFLOP per image)")]


def _bench_channels_last_row(clip, tag, batch, device, warmup, repeats):
    # ResNet image tower forward, channels-last (NHWC) vs the default contiguous (NCHW)
    import copy
    images = _random_images(clip, batch, 4, device)
    visual_cl = copy.deepcopy(clip.visual).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return _compare(f"channels_last_vs_default{tag}", lambda: clip.visual(images),
                        lambda: visual_cl(images_cl), device, warmup, repeats,
                        f"image tower forward, batch {batch}")


def _bench_machine(device, quick):
    import platform
    m = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
         "torch": torch.__version__, "python": platform.python_version(),
         "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(),
         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "ext_available": bool(EXT_AVAILABLE), "quick": quick}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):  # other processes on the machine make timings noisy: say so
        m["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
        m["bf16"] = torch.cuda.is_bf16_supported()
    else:
        m["bf16"] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return m


def bench(quick=False, json_path=None):
    """Measured speed-ups of every fast path, side by side (docs/speed.md). Returns
    {"machine": {...}, "rows": [...]} and prints a table; with json_path also writes it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = _bench_machine(device, quick)
    t_start = time.perf_counter()
    if quick:  # toy layouts, seconds: the test suite runs this
        vit, rn, C, batch, eval_batch, img_batch = BENCH_TINY_VIT, BENCH_TINY_RN, 20, 4, 2, 4
        warm, reps, big_warm, big_reps, n_gemm, target_ms = 1, 2, 1, 2, 256, 2
        loss_sizes, prop_sizes = [(256, 80)], [(80, 512)]
    else:  # the real layouts; the big rows get few repeats (a ViT-B/16 train step is ~20 s on 2 cores)
        vit, rn, C, batch, eval_batch, img_batch = BENCH_VIT_B16, BENCH_RN50, 80, 32, 4, 8
        warm, reps, big_warm, big_reps, n_gemm, target_ms = 2, 7, 1, 2, 1024, 20
        loss_sizes = [(256, 80), (64, 20), (64, 80), (256, 20), (64, 1000), (256, 1000)]
        prop_sizes = [(80, 512), (20, 512), (1000, 512), (20, 1024), (80, 1024), (1000, 1024)]
    vit_variants = [v for v in TRAIN_VARIANTS if machine["bf16"] or not v.startswith("bf16")]
    for key, dtype in [("fp32", torch.float32)] + [("bf16", torch.bfloat16)] * machine["bf16"]:
        a, b = torch.randn(2, n_gemm, n_gemm, device=device).to(dtype)  # the machine's GEMM rate
        ms, _ = _time_variants({"mm": lambda: a @ b}, 2, reps, device)
        machine[f"{key}_gemm_gflops"] = round(2 * n_gemm ** 3 / (ms["mm"] * 1e-3) / 1e9, 1)
    say = lambda what: print(f"bench: {what} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    big = dict(device=device, warmup=big_warm, repeats=big_reps)
    say("fused ops")
    rows = _bench_fused_rows(loss_sizes, prop_sizes, device, warm, reps, target_ms)
    say("ViT text tower")
    model, train_targets = _bench_model(vit, C, device)
    rows.append(_bench_text_row(model, 16, **big))
    say(f"ViT train steps: {', '.join(vit_variants)}")
    gemm = {k: machine.get(f"{k}_gemm_gflops") for k in ("fp32", "bf16")}
    rows += _bench_train_rows(model, train_targets, "", batch, vit_variants, **big, gemm_gflops=gemm)
    rows.append(_bench_first_use_row(model, train_targets, batch, **big))
    say("ViT eval and image tower")
    rows.append(_bench_eval_row(model, "_vit", eval_batch, 5, **big))
    if machine["bf16"]:
        rows.append(_bench_eval_bf16_row(model, "_vit", eval_batch, 5, **big, gemm_gflops=gemm))
        n_tokens = (vit["image_resolution"] // vit["vision_patch_size"]) ** 2 + 1
        rows.append(_bench_attention_bf16_row(batch, vit["vision_width"] // 64, n_tokens, 64, device, warm, reps))
    rows += _bench_image_rows(model.clip, "_vit", img_batch, n_gemm, **big)
    del model
    say("RN50 train step, eval, channels-last")
    model, train_targets = _bench_model(rn, C, device)
    rows += _bench_train_rows(model, train_targets, "_rn50", batch, ["fast", "naive"], **big, gemm_gflops=gemm)
    rows.append(_bench_eval_row(model, "_rn50", eval_batch, 5, **big))
    rows.append(_bench_channels_last_row(model.clip, "_rn50", img_batch, **big))
    machine["peak_rss_mb"] = round(_peak_rss_mb())
    machine["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    result = {"machine": machine, "rows": rows}
    print(format_bench(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    return result


def format_bench(result):
    m = result["machine"]
    lines = [f"bench on {m['device']} ({m.get('gpu', m['cpu'])}, {m['cpu_count']} cores, torch {m['torch']}, "
             f"extension {'built' if m['ext_available'] else 'not built: fused rows run the reference'}"
             f"{', quick toy layouts' if m['quick'] else ''}); load at start {m.get('loadavg_at_start')}",
             f"fp32 GEMM {m['fp32_gemm_gflops']} GFLOP/s" +
             (f", bf16 GEMM {m['bf16_gemm_gflops']} GFLOP/s" if "bf16_gemm_gflops" in m else ", no bf16"),
             f"{'row':<36} {'baseline ms':>12} {'fast ms':>10} {'ratio':>7} {'max|diff|':>10}  note"]
    for r in result["rows"]:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"{r['name']:<36} {r['baseline_ms']:>12.3f} {r['fast_ms']:>10.3f} {r['ratio']:>7.2f} "
                     f"{diff:>10}  {r['note']}")
    lines.append(f"peak RSS {m['peak_rss_mb']} MB, {m['wall_seconds']} s, load at end {m.get('loadavg_at_end')}")
    return "\n".join(lines)


# --check: no timing. The code that cannot be tested on the developers' machines (CUDA kernels, bf16 on a GPU, nccl)
# checked where it runs, against the pure-torch references, before a long run trusts it (`capnet.py check` runs this)
CHECK_C, CHECK_B = (1, 20, 80, 1000), (1, 32, 257)  # classes (one ... an ImageNet-size head) and batch sizes
CHECK_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # every op accepts each


def check_cases(op, device, dtype):
    """(kernel, reference, inputs) of op over every C and B, contiguous and not, on device in dtype."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    for C, B, transposed in [(C, B, t) for C in CHECK_C for B in CHECK_B for t in (False, True)]:
        put = lambda t: (t.T.contiguous().T if transposed else t).to(device, dtype)  # transposed: column-major
        if op == "db_focal_loss":
            y = (torch.rand(B, C, generator=g) < 0.3).to(device, dtype)  # (B, C)
            n = torch.randint(1, 300, (C,), generator=g).double()  # (C,)
            weight = class_aware_weights(n, 4.0).to(device, dtype)
            exponents = dict(gamma=4.0, gamma_neg=0.0) if transposed else {}  # the authors' recipe's, and ours
            kernel, reference = capnet.db_focal_pair(y, n.to(device), 400, weight, **exponents)
            yield kernel, reference, [put(rand(B, C) * 5)]
        elif op == "graph_propagate":
            kernel, reference = capnet.propagate_pair(0.2, activation=C % 2 == 0)
            adj = torch.softmax(rand(C, C), dim=1)  # (C, C) rows summing to 1, like P
            yield kernel, reference, [put(adj), put(rand(C, B)), put(rand(B, 48) / B ** 0.5)]
        else:
            yield torch.ops.capnet.quick_gelu, capnet.quick_gelu_reference, [put(rand(B, C) * 4)]


def check_ops(device):
    """One row per (op, dtype): every case forward and backward against the reference, at the first-use check's
    tolerance."""
    rows = []
    for op in capnet.FUSED_OPS:
        for dtype in CHECK_DTYPES:
            cases = list(check_cases(op, device, dtype))
            bad = [e for e in (capnet.compare_with_reference(*c, widen=op in capnet.WIDEN) for c in cases) if e]
            detail = f"{len(cases)} cases, forward and backward, tolerance {capnet.RTOL[dtype]:.0e}"
            rows.append((str(device), f"{op} {str(dtype).removeprefix('torch.')}",
                         detail + (f": {bad[0]}" if bad else ""), not bad))
    return rows


def check_train_step(device):
    """One CAPNet train step of a tiny random CLIP on device in fp32 and under bf16 autocast, from the same start:
    the losses and the parameter updates must agree within bf16's rounding."""
    classes, counts = ["cat", "dog", "race car", "palm tree", "boat"], [40, 25, 6, 12, 3]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g).to(device)
    targets = (torch.rand(8, 5, generator=g) < 0.4).float().to(device)
    out = []
    for amp in (False, True):
        clip = capnet.install_fast_paths(_bench_clip(BENCH_TINY_VIT, device))
        # our recipe's SGD (the update is the gradient's direction); amp "none": the frozen weights stay fp32 in
        # both runs (on a GPU "auto" would hold them in bf16)
        cfg = Config(**{**capnet.RECIPES["ours"]["*"], "ctx_init": "a photo of a", "amp": "none"})
        model = capnet.build_model(clip, classes, cfg, None, device)
        optimizer = capnet.build_optimizer(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        loss = capnet.train_step(model, make_criterion(cfg, counts, 50), optimizer,
                                 torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), images, targets, amp)
        out.append((loss.item(), torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])))
    (loss32, step32), (loss16, step16) = out
    rel = abs(loss16 - loss32) / abs(loss32)
    cos = torch.nn.functional.cosine_similarity(step16, step32, dim=0).item()
    detail = f"loss {loss32:.4f} vs {loss16:.4f} ({rel:.1%}, tolerance 2%), update cosine {cos:.4f} (>= 0.99)"
    return str(device), "train step bf16 vs fp32", detail, rel <= 0.02 and cos >= 0.99


def _all_reduce_worker(rank, world, port, device_type):
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    x = torch.full((1000,), rank + 1.0, device=device)
    torch.distributed.all_reduce(x)
    torch.distributed.destroy_process_group()
    if not torch.equal(x.cpu(), torch.full((1000,), world * (world + 1) / 2)):
        raise RuntimeError(f"rank {rank}: all-reduce gave {x[:3].tolist()}..., expected {world * (world + 1) / 2}")


def check_all_reduce(device_type):
    """An all-reduce over the device type's DDP backend: gloo over 2 CPU processes; nccl over 2 GPUs (1 if one)."""
    world = 2 if device_type == "cpu" or torch.cuda.device_count() > 1 else 1
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    what = f"all-reduce, {'gloo' if device_type == 'cpu' else 'nccl'}, {world} processes"
    try:
        torch.multiprocessing.spawn(_all_reduce_worker, (world, port, device_type), nprocs=world)
        return device_type, what, "every process holds the sum", True
    except Exception as e:
        return device_type, what, f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}", False


def check(devices=None, all_reduce=True) -> list:
    """Per device (the CPU and every CUDA device): whether the extension has kernels for it, each fused op forward
    and backward against its reference, a tiny train step bf16 vs fp32, an all-reduce over the DDP backend. Prints
    one table -> the failed rows (none: everything passed)."""
    devices = devices or ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    rows = []
    for device in map(torch.device, devices):
        has = EXT_AVAILABLE and (device.type == "cpu" or capnet.EXT_CUDA)
        built = f"built, kernels for cpu{' and cuda' if capnet.EXT_CUDA else ''}"
        rows.append((str(device), "extension", built if has else f"{capnet._why_no_kernel(device)}: the pure-torch "
                     f"path runs ({capnet.BUILD_HINT})", has))
        rows += check_ops(device) if has else []
        rows.append(check_train_step(device))
        if all_reduce and device.index in (None, 0):
            rows.append(check_all_reduce(device.type))
    width = max(len(r[1]) for r in rows)
    print(f"{'device':8s} {'check':{width}s} {'result':6s} detail")
    for device, what, detail, ok in rows:
        print(f"{device:8s} {what:{width}s} {'ok' if ok else 'FAILED':6s} {detail}")
    failed = [r for r in rows if not r[3]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed" +
          "".join(f"\nFAILED: {r[0]} {r[1]}: {r[2]}" for r in failed), flush=True)
    return failed



def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description="measured speed-ups of CAPNet's fast paths")
    parser.add_argument("--quick", action="store_true", help="toy layouts, seconds (what the tests run)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--check", action="store_true", help="no timing: the fused ops, a bf16 step and DDP checked "
                        "against their references on every device; exit 1 naming each failure")
    args = parser.parse_args(argv)
    if args.check:
        sys.exit(1 if check() else 0)
    bench(quick=args.quick, json_path=args.json)


if __name__ == "__main__":
    main()

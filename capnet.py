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

# -----------------------------------------------------------------------------
# train

# -----------------------------------------------------------------------------
# eval and predict

# -----------------------------------------------------------------------------
# bench

# Every row times a baseline and a fast path side by side in this one process: warm-up first,
# then rounds that alternate the variants (so a load spike on the shared machine hits both),
# and the median over rounds. ratio = baseline_ms / fast_ms; max_abs_diff compares outputs.

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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_variants(fns, warmup, repeats, device, inner=1):
    """fns: {name: fn}. Returns ({name: median ms per call}, {name: last output of the warm-up})."""
    outs = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: a, b, a, b, ...
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {name: float(np.median(s)) for name, s in samples.items()}, outs


def _calibrate_inner(fn, device, target_ms):
    """How many calls of a tiny op make one timing sample of about target_ms (timer noise)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(1000, int(target_ms / max(ms, 1e-3))))


def _max_abs_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(_max_abs_diff(x, y) for x, y in zip(a, b))
    return float((a.detach().double() - b.detach().double()).abs().max())


def _row(name, baseline_ms, fast_ms, max_abs_diff, note=""):
    return {"name": name, "baseline_ms": round(baseline_ms, 4), "fast_ms": round(fast_ms, 4),
            "ratio": round(baseline_ms / fast_ms, 4), "max_abs_diff": max_abs_diff, "note": note}


def _matmul_gflops(dtype, device, n, repeats):
    """The machine's measured dense matrix-multiply rate (n x n @ n x n), GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms, _ = _time_variants({"mm": lambda: a @ b}, warmup=2, repeats=repeats, device=device)
    return 2 * n ** 3 / (ms["mm"] * 1e-3) / 1e9


def _vit_forward_flops(visual, batch):
    """Multiply-add FLOPs (2 per MAC) of a VisionTransformer forward, counted from its shapes:
    per block 24 N W^2 (qkv, out proj, 4x MLP) + 4 N^2 W (QK^T and AV); patch conv; final proj."""
    w = visual.conv1.out_channels
    p = visual.conv1.kernel_size[0]
    n_patch = (visual.input_resolution // p) ** 2
    n = n_patch + 1
    layers = len(visual.transformer.resblocks)
    per_image = (2 * n_patch * 3 * p * p * w + layers * (24 * n * w * w + 4 * n * n * w)
                 + 2 * w * visual.proj.shape[1])
    return batch * per_image


def _bench_clip(layout, device):
    torch.manual_seed(0)
    return CLIP(**layout).float().to(device).eval()  # random weights (OpenAI's init)


def _bench_classnames(c):
    # short made-up names (1-3 BPE tokens each, like "traffic light"): the EOT lands where real
    # class names put it, which is what truncation depends on
    return [f"thing {i}" for i in range(c)]


def _bench_fused_rows(sizes_loss, sizes_prop, device, warmup, repeats, target_ms):
    rows = []
    g = torch.Generator().manual_seed(0)
    for b, c in sizes_loss:
        logits = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_()
        targets = (torch.rand(b, c, generator=g) < 0.1).float().to(device)
        class_freq = torch.randint(1, 1000, (c,), generator=g).float().to(device)
        num_images = 5000

        def run(fn):
            def step():
                logits.grad = None
                loss = fn(logits, targets, class_freq, num_images)
                loss.backward()
                return loss.detach(), logits.grad.detach().clone()
            return step
        fns = {"ref": run(db_focal_loss_reference),
               "fused": run(lambda *a: db_focal_loss(*a, backend="auto"))}
        inner = _calibrate_inner(fns["ref"], device, target_ms)
        ms, outs = _time_variants(fns, warmup, repeats, device, inner)
        name = "loss_fused_vs_ref" if (b, c) == (256, 80) else f"loss_fused_vs_ref_B{b}_C{c}"
        rows.append(_row(name, ms["ref"], ms["fused"], _max_abs_diff(outs["ref"], outs["fused"]),
                         "fwd+bwd"))
    for c, d in sizes_prop:
        a = torch.softmax(torch.randn(c, c, generator=g), dim=1).to(device)
        x = torch.randn(c, d, generator=g).to(device).requires_grad_()
        w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device).requires_grad_()

        def run(fn):
            def step():
                x.grad = w.grad = None
                out = fn(a, x, w)
                out.backward(torch.ones_like(out))
                return out.detach(), x.grad.detach().clone(), w.grad.detach().clone()
            return step
        fns = {"ref": run(graph_propagate_reference),
               "fused": run(lambda *t: graph_propagate(*t, backend="auto"))}
        inner = _calibrate_inner(fns["ref"], device, target_ms)
        ms, outs = _time_variants(fns, warmup, repeats, device, inner)
        name = "propagate_fused_vs_ref" if (c, d) == (80, 512) else f"propagate_fused_vs_ref_C{c}_D{d}"
        rows.append(_row(name, ms["ref"], ms["fused"], _max_abs_diff(outs["ref"], outs["fused"]),
                         "fwd+bwd"))
    return rows



def _bench_text_row(clip, n_classes, n_ctx, device, warmup, repeats):
    """Prompt-learner text encoding, forward+backward (what training runs every step):
    the shortest context that holds every EOT against all 77 positions."""
    prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in _bench_classnames(n_classes)]
    tokens = tokenize(prompts).to(device)                                  # (C, 77)
    eot = tokens.argmax(dim=-1)                                            # (C,) EOT has the largest id
    x = clip.token_embedding(tokens).detach().requires_grad_()             # (C, 77, W)

    def run(truncate):
        def step():
            x.grad = None
            out = clip.encode_text_embeddings(x, eot, truncate=truncate)  # (C, D)
            out.backward(torch.ones_like(out))
            return out.detach(), x.grad.detach().clone()
        return step
    ms, outs = _time_variants({"full": run(False), "truncated": run(True)}, warmup, repeats, device)
    length = int(eot.max()) + 1
    return _row("text_truncated_vs_full", ms["full"], ms["truncated"],
                _max_abs_diff(outs["full"], outs["truncated"]),
                f"C={n_classes}, {n_ctx} ctx tokens: {length} of {tokens.shape[1]} positions, fwd+bwd")


def _bench_model(layout, n_classes, device):
    """A CAPNet on a random-weight CLIP of the given layout, with a made-up long-tailed label set."""
    clip = _bench_clip(layout, device)
    rng = np.random.default_rng(0)
    c = np.arange(n_classes)
    train_targets = (rng.random((2000, n_classes)) < 0.3 * 0.9 ** c).astype(np.float32)  # (N, C) long tail
    train_targets[c % 2000, c] = 1.0  # every class has a training image
    torch.manual_seed(0)
    model = CAPNet(clip, _bench_classnames(n_classes), Config(), train_targets.sum(0), train_targets)
    return model.to(device), train_targets


def _set_fast_paths(model, truncate=True, fused=True):
    # switches of the model's fast paths (attention: see _attention_context)
    model.prompt_learner.truncate = truncate  # False: all 77 positions, as openai/CLIP runs it
    model.gcn.backend = "auto" if fused else "torch"


def _attention_context(sdpa):
    # SDPA off = PyTorch's unfused math attention (Q K^T, softmax, then V), the reference
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return contextlib.nullcontext() if sdpa else sdpa_kernel(SDPBackend.MATH)


def _peak_note(device):
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return f"peak {mb:.0f} MB (CUDA allocated, this row)"
    return f"peak RSS {_peak_rss_mb():.0f} MB (process so far)"


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


TRAIN_VARIANTS = {  # name: (truncate, sdpa, fused, bf16)
    "fast": (True, True, True, False),
    "naive": (False, False, False, False),
    "bf16": (True, True, True, True),
    "no_truncate": (False, True, True, False),
    "no_sdpa": (True, False, True, False),
    "no_fused": (True, True, False, False),
}


def _bench_train_rows(model, train_targets, tag, batch, variants, device, warmup, repeats):
    """A whole CAPNet train step (forward, DB-focal loss, backward, SGD step) per variant."""
    C = len(model.classnames)
    size = model.clip.visual.input_resolution
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)  # (B, 3, S, S)
    targets = torch.from_numpy(train_targets[:batch]).to(device)  # (B, C)
    class_freq, n = train_targets.sum(0), len(train_targets)
    criteria = {fused: make_criterion(Config(backend="auto" if fused else "torch"), class_freq, n)
                for fused in (True, False)}
    params = [p for part in model.trainable_parts().values() for p in part]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    model.train()

    def make_step(truncate, sdpa, fused, bf16):
        def step():
            with torch.no_grad():  # every step starts from the same weights: outputs comparable
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            _set_fast_paths(model, truncate, fused)
            opt.zero_grad(set_to_none=True)
            with _attention_context(sdpa), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(images)  # (B, C)
            loss = criteria[fused](logits.float(), targets)  # loss in fp32 (SPEC 6)
            loss.backward()
            opt.step()
            return logits.detach().float()
        return step
    fns = {v: make_step(*TRAIN_VARIANTS[v]) for v in variants}
    ms, outs = _time_variants(fns, warmup, repeats, device)
    _set_fast_paths(model)
    peak = _peak_note(device)
    ips = lambda v: f"{batch / ms[v] * 1e3:.2f}"
    rows = []
    for v in variants:
        if v == "fast":
            continue
        if v == "naive":
            name = f"train_step_fast_vs_naive{tag}"
            row = _row(name, ms["naive"], ms["fast"], _max_abs_diff(outs["naive"], outs["fast"]),
                       f"C={C}, batch {batch}, fp32: {ips('fast')} vs {ips('naive')} img/s; {peak}")
        elif v == "bf16":
            row = _row(f"train_step_bf16_vs_fp32{tag}", ms["fast"], ms["bf16"],
                       _max_abs_diff(outs["fast"], outs["bf16"]),
                       f"bf16 autocast, all fast paths on: {ips('bf16')} vs {ips('fast')} img/s; "
                       "diff = logits, bf16 rounding")
        else:
            row = _row(f"train_step_fast_vs_{v}{tag}", ms[v], ms["fast"],
                       _max_abs_diff(outs[v], outs["fast"]), f"gain of one fast path, batch {batch}, fp32")
        rows.append(row)
    return rows


def _bench_eval_row(model, tag, batch, n_views, device, warmup, repeats):
    """TTE eval: batch x n_views crops through the image tower, logits averaged over views;
    F_hat (text tower + GCN) cached once vs recomputed for every batch."""
    C = len(model.classnames)
    size = model.clip.visual.input_resolution
    g = torch.Generator().manual_seed(2)
    views = torch.randn(batch * n_views, 3, size, size, generator=g).to(device)  # (B*V, 3, S, S)
    model.eval()

    def make_step(cached):
        def step():
            if not cached:
                model._text_cache = None  # what an uncached eval recomputes per batch
            with torch.no_grad():
                return model(views).view(batch, n_views, C).mean(dim=1)  # (B, C)
        return step
    ms, outs = _time_variants({"uncached": make_step(False), "cached": make_step(True)},
                              warmup, repeats, device)
    ips = lambda v: f"{batch / ms[v] * 1e3:.2f}"
    return _row(f"eval_tte_cached_vs_uncached{tag}", ms["uncached"], ms["cached"],
                _max_abs_diff(outs["uncached"], outs["cached"]),
                f"C={C}, {batch} images x {n_views} views: {ips('cached')} vs {ips('uncached')} img/s; "
                f"{_peak_note(device)}")


def _bench_image_rows(clip, tag, batch, gemm_gflops, device, warmup, repeats):
    """ViT image tower forward: SDPA vs math attention, and its FLOP rate vs the GEMM rate."""
    size = clip.visual.input_resolution
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)

    def make_step(sdpa):
        def step():
            with torch.no_grad(), _attention_context(sdpa):
                return clip.encode_image(images)  # (B, D)
        return step
    ms, outs = _time_variants({"math": make_step(False), "sdpa": make_step(True)}, warmup, repeats, device)
    flops = _vit_forward_flops(clip.visual, batch)
    ideal_ms = flops / (gemm_gflops * 1e9) * 1e3
    rate = flops / (ms["sdpa"] * 1e-3) / 1e9
    return [_row(f"attention_sdpa_vs_math{tag}", ms["math"], ms["sdpa"],
                 _max_abs_diff(outs["math"], outs["sdpa"]), f"image tower forward, batch {batch}"),
            _row(f"image_fwd_vs_gemm_rate{tag}", ideal_ms, ms["sdpa"], None,
                 f"ratio = achieved fraction of the fp32 GEMM rate: {rate:.1f} of {gemm_gflops:.1f} GFLOP/s "
                 f"({flops / batch / 1e9:.2f} GFLOP per image)")]


def _bench_channels_last_row(clip, tag, batch, device, warmup, repeats):
    """ResNet image tower forward, channels-last (NHWC) vs the default contiguous (NCHW)."""
    size = clip.visual.input_resolution
    import copy
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(4)).to(device)
    visual_cl = copy.deepcopy(clip.visual).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def make_step(visual, x):
        def step():
            with torch.no_grad():
                return visual(x)  # (B, D)
        return step
    ms, outs = _time_variants({"nchw": make_step(clip.visual, images), "nhwc": make_step(visual_cl, images_cl)},
                              warmup, repeats, device)
    return _row(f"channels_last_vs_default{tag}", ms["nchw"], ms["nhwc"],
                _max_abs_diff(outs["nchw"], outs["nhwc"]), f"image tower forward, batch {batch}")


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
    if hasattr(os, "getloadavg"):
        m["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
        m["bf16"] = torch.cuda.is_bf16_supported()
    else:
        m["bf16"] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return m


def bench(quick=False, json_path=None):
    """Measured speed-ups of every fast path, side by side (SPEC 7). Returns
    {"machine": {...}, "rows": [...]} and prints a table; with json_path also writes it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = _bench_machine(device, quick)
    t_start = time.perf_counter()
    if quick:  # toy layouts, a few seconds: the test suite runs this
        vit, rn, C, batch, eval_batch, img_batch = BENCH_TINY_VIT, BENCH_TINY_RN, 80, 4, 2, 4
        warm, reps, big_warm, big_reps, n_gemm = 1, 3, 1, 2, 256
        loss_sizes, prop_sizes = [(256, 80), (64, 20)], [(80, 512)]
        vit_variants = ("fast", "naive", "bf16")
    else:  # the real layouts; the big rows get few repeats (a ViT-B/16 train step is ~20 s on 2 cores)
        vit, rn, C, batch, eval_batch, img_batch = BENCH_VIT_B16, BENCH_RN50, 80, 32, 8, 8
        warm, reps, big_warm, big_reps, n_gemm = 2, 7, 1, 2, 2048
        loss_sizes = [(256, 80), (64, 20), (64, 80), (256, 20), (64, 1000), (256, 1000)]
        prop_sizes = [(80, 512), (20, 512), (1000, 512), (20, 1024), (80, 1024), (1000, 1024)]
        vit_variants = ("fast", "naive", "bf16", "no_truncate", "no_sdpa", "no_fused")
    if not machine["bf16"]:
        vit_variants = tuple(v for v in vit_variants if v != "bf16")
    machine["fp32_gemm_gflops"] = round(_matmul_gflops(torch.float32, device, n_gemm, reps), 1)
    if machine["bf16"]:
        machine["bf16_gemm_gflops"] = round(_matmul_gflops(torch.bfloat16, device, n_gemm, reps), 1)
    rows = _bench_fused_rows(loss_sizes, prop_sizes, device, warm, reps, 2 if quick else 20)
    model, train_targets = _bench_model(vit, C, device)
    rows.append(_bench_text_row(model.clip, C, 16, device, big_warm, big_reps))
    rows += _bench_train_rows(model, train_targets, "", batch, vit_variants, device, big_warm, big_reps)
    rows.append(_bench_eval_row(model, "_vit", eval_batch, 5, device, big_warm, big_reps))
    rows += _bench_image_rows(model.clip, "_vit", img_batch, machine["fp32_gemm_gflops"], device,
                              big_warm, big_reps)
    del model
    model, train_targets = _bench_model(rn, C, device)
    rows += _bench_train_rows(model, train_targets, "_rn50", batch, ("fast", "naive"), device, big_warm, big_reps)
    rows.append(_bench_eval_row(model, "_rn50", eval_batch, 5, device, big_warm, big_reps))
    rows.append(_bench_channels_last_row(model.clip, "_rn50", img_batch, device, big_warm, big_reps))
    machine["peak_rss_mb"] = round(_peak_rss_mb())
    machine["wall_seconds"] = round(time.perf_counter() - t_start, 1)
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
    lines.append(f"peak RSS {m['peak_rss_mb']} MB, {m['wall_seconds']} s")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    main()

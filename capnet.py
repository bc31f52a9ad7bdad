"""
CAPNet: correlation adaptation prompt network for long-tailed multi-label recognition (arXiv 2511.20641).

CLIP with class-specific soft prompts, a three-layer residual GCN over a label graph taken from CLIP's text
encoder, a distribution-balanced focal loss with class-aware re-weighting, AdaptFormer (ViT) or bias tuning
(ResNet), and five-crop test-time ensembling. The method comes first, in one section; the rest is what it runs
on. Steps (1)-(9) and the choices with their sources: README.md. bench.py and data_prep.py import this file.

Line map:
     47  config
    163  the method
    657  ablations and baselines
    708  vendored CLIP
   1140  images
   1223  data
   1390  fast paths
   1703  runs
   2408  eval and predict
   2524  CLI
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gzip
import html
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# config: one dataclass (the coco-lt run), the recipes, per-benchmark presets, baseline methods

@dataclass
class Config:
    """The defaults are the run `capnet.py train --data coco-lt` makes: the authors' recipe (below) on ViT-B/16.
    PRESETS and RECIPES["ours"] hold only their differences from it."""
    # (2) prompts
    n_ctx: int = 16                   # M, random context vectors per class (acts only with ctx_init "")
    ctx_init: str = "a photo of a"    # the context starts as this template's tokens, M their count; "" = N(0, 0.02^2)
    ctx: str = "class"                # class: M vectors per class (CAPNet, LMPT) | shared: one (M, W) set (CoOp)
    # (3) label graph, (4) GCN
    graph: str = "text"               # text | cooccur | identity (GCN as a per-class MLP) | none (GCN frozen at 0)
                                      # | a .npy, .pt or .txt file holding a C x C matrix P (rows scaled to sum 1)
    s: float = 10.0                   # s, sharpness of our text graph's softmax (graph_tau 0 only)
    p: float = 0.2                    # p, neighbour weight: P = (1 - p) I + p A; with graph_tau > 0 the neighbours'
                                      # share of each row before the softmax, not in P
    graph_topk: int = 60              # k: keep each class's k most similar classes, itself included (0 = all)
    graph_tau: float = 0.3            # T > 0: the pre-paper code's text graph, softmax(A / T) over kept entries
    gcn_hidden: int = 2048            # width of the GCN's two hidden layers (0 = D)
    # (5) PEFT
    peft: str = "adaptformer"         # adaptformer (ViT) / bias tuning (ResNet) | none | full (all of CLIP)
    adapter_dim: int = 0              # r, AdaptFormer bottleneck (0 = LIFT rule)
    clip_lr_scale: float = 0.1        # --peft full: CLIP's own weights train at lr * this (ours: gentler than prompts)
    # (7) loss
    loss: str = "db-focal"            # db-focal | bce | focal | asl
    alpha: float = 0.1                # alpha, rebalance weight floor
    beta: float = 10.0                # beta, rebalance sigmoid steepness
    mu: float = 0.2                   # mu, rebalance sigmoid centre
    kappa: float = 0.05               # kappa, NTR bias scale
    lam: float = 2.0                  # lambda, NTR negative-logit scale
    gamma: float = 4.0                # gamma, focal exponent (db-focal: on positives; focal: on all)
    gamma_neg: float = 0.0            # DB-focal's focal exponent on negatives (< 0: gamma)
    balance: float = 1.0              # overall scale of the DB-focal term (Wu et al.: 2)
    tau_prime: float = 4.0            # tau', class-aware re-weighting temperature (inf = off); DB-focal only
    # (8) test-time ensembling
    tte: int = 5                      # test-time views: 1 | 5 | 10
    # optimisation
    recipe: str = "authors"           # authors | ours: a preset of the flags around it (RECIPES)
    optimizer: str = "adam"           # adam (L2 weight decay added to the gradient) | sgd (momentum)
    schedule: str = "onecycle"        # onecycle: torch's OneCycleLR, 20% up | cosine: linear warm-up, cosine to 0
    epochs: int = 60
    batch_size: int = 32
    lr: float = 5e-4                  # peak learning rate of every group but the temperature (and --gcn-lr)
    gcn_lr: float = 1e-4              # the GCN's own peak lr (0 = --lr)
    temperature_lr_scale: float = 0.0  # lr of t = lr * this; 0 = t frozen
    momentum: float = 0.9             # SGD only
    weight_decay: float = 1e-4        # not on the temperature and adapter scales
    prompt_weight_decay: float = -1.0  # weight decay of the prompt context vectors (< 0: --weight-decay)
    warmup_epochs: float = 1.0        # cosine schedule only
    # data, backbone, images
    data: str = "coco-lt"             # dataset name: data/<data>/dataset.json (the command line's default: synthetic-lt)
    data_root: str = "data"           # folder holding the prepared datasets
    clip: str = "ViT-B/16"            # CLIP model name or checkpoint path ("" = data/<data>/clip.pt, the world's own)
    input_size: int = 224             # crop size fed to the image tower
    scale_min: float = 0.08           # random resized crop scale range (scale_min, 1)
    sampler: str = "uniform"          # uniform: each image once per epoch | class-aware: inverse-frequency draws
    sampler_power: float = 1.0        # q: class-aware weight of image i = sum_c y_ic n_c^-q
    eval_batch_size: int = 64
    # runtime
    name: str = ""                    # run name -> runs/<name>/ ("" = derived from the fields off the preset)
    out_dir: str = "runs"             # folder of all runs
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
    ckpt_every: int = 0               # extra checkpoint every this many steps (0: end of each epoch only)


# --recipe, laid first: "authors" (Config's defaults) is the public pre-paper code's choices
# (github.com/Wang-zuozheng/qusi, commit 6d575b5; we infer, not know, that it is the authors') wherever the paper
# does not contradict them; "ours" the ancestors' (README "Choices and assumptions" has each source)
RECIPES = {
    "authors": {"*": {}, "voc-lt": dict(epochs=64, graph_topk=20),
                "synthetic-lt": dict(gcn_hidden=384)},  # 4 D, as 2048 is to ViT-B/16's D = 512 (a miniature)
    "ours": {"*": dict(optimizer="sgd", schedule="cosine", lr=0.01, gcn_lr=0.0, weight_decay=5e-4,
                       temperature_lr_scale=0.01, gcn_hidden=0, graph_topk=0, graph_tau=0.0, ctx_init="",
                       batch_size=64, scale_min=0.5, epochs=30, gamma=2.0, gamma_neg=-1.0, balance=2.0),
             # the small CLIP at logit scale 100 as OpenAI's: v3's steps carried from scale 14.4, lr / 6.96, every
             # decay x 6.96 (lr 0.01 collapses at 100; at 5e-4 prompt decay the prompts memorise rare classes' images)
             "synthetic-lt": dict(lr=0.00144, weight_decay=0.00348, prompt_weight_decay=0.139)},
}

# per-data presets, laid over the recipe's common part: only what differs from Config (a data set not named here,
# e.g. one prepared with `data_prep.py lists`, trains Config's run). The real benchmarks train the authors' recipe
# by default (README "Choices and assumptions": why); the synthetic world keeps ours, which passes its bars
PRESETS = {
    # the embedded default (data_prep.make_synthetic_lt): 48 px scenes, its own small ViT CLIP, 10 minutes on 2 CPU
    # cores; step 0 is exactly zero-shot (docs/synthetic-lt.md)
    "synthetic-lt": dict(recipe="ours", clip="", input_size=48, epochs=60, batch_size=32, ctx_init="a photo of a",
                         workers=0),
    "voc-lt": dict(mu=0.3, lam=5.0),
    "coco-lt": {},
    "nus-wide-lt": {},  # NUS-WIDE: no setting in the pre-paper code; COCO-LT's (assumed)
}

# --method presets: flags only, laid over the data preset; any flag given still wins. One protocol for
# all (README "Methods and baselines"): sigmoid scores, last epoch, CLIP statistics, same schedule and TTE
METHODS = {
    "capnet": {},
    "zero-shot": dict(epochs=0),  # plain CLIP, "a photo of a {name}.": the trained columns = step-0 zero-shot
    # CoOp (Zhou et al. 2022): one context for all classes; sigmoid BCE, as CoOp's softmax CE is single-label
    "coop": dict(ctx="shared", graph="none", peft="none", loss="bce"),
    # LMPT (Xia et al. 2023, richard-peng-xia/LMPT): class-specific context from "a photo of a", DB-focal
    # without class-aware weights (Wu et al.'s focal exponent 2 on both signs and scale 2), no random crop (whole
    # image, + flip); its caption loss is left out
    "lmpt": dict(ctx_init="a photo of a", graph="none", peft="none", tau_prime=float("inf"), scale_min=1.0,
                 gamma=2.0, gamma_neg=-1.0, balance=2.0),
}

# -----------------------------------------------------------------------------
# the method: prompts, label graph, GCN, PEFT, head, loss, test-time views, metrics, optimizer, train step

# The method in the order of README "The method", steps (1)-(9); comments cite those steps. CLIP (1) is vendored
# below this section; the fused kernels of GCN and loss are dispatched in "fast paths", and the model calls them
# as plain functions whose pure-torch references stand here.

# (2) class-specific soft prompts, as LMPT; CoOp's shared context is the --ctx shared baseline

class PromptLearner(nn.Module):
    """Class c is read by the text encoder as [SOT] v_1^c .. v_M^c <name_c> . [EOT]; only the v's learn.
    With `ctx_init` (e.g. "a photo of a") every class's context starts as that template's token embeddings
    and M is its token count (CoOp's convention; a given --n-ctx is refused), so the untrained prompts read exactly
    "a photo of a {name}." With `shared` (CoOp) one (M, W) context serves every class, not a (C, M, W) one."""

    def __init__(self, clip, classnames, n_ctx=16, ctx_init="", shared=False, generator=None):
        super().__init__()
        # a reference, not a submodule: the frozen CLIP is registered once, under CAPNet.clip
        object.__setattr__(self, "clip", clip)
        device = clip.token_embedding.weight.device
        bpe = _tokenizer()
        init_ids = bpe.encode(ctx_init) if ctx_init else []
        M = len(init_ids) if ctx_init else n_ctx
        if M < 1:
            raise ValueError(f"the context needs a token: n_ctx {n_ctx}, ctx_init {ctx_init!r}")
        rows = []
        for name in classnames:
            name_ids = bpe.encode(name.replace("_", " ") + ".")
            rows.append([SOT] + [0] * M + name_ids + [EOT])  # the zeros are replaced by the context
            if len(rows[-1]) > clip.context_length:
                raise ValueError(f"the prompt of class {name!r} needs {len(rows[-1])} tokens ({M} context + "
                                 f"{len(name_ids)} for the name + SOT/EOT), more than CLIP's context length "
                                 f"{clip.context_length}; shorten the name or --n-ctx")
        eot_index = [len(ids) - 1 for ids in rows]
        # the text encoder is causal: keep only max(EOT) + 1 positions (same features, a third of the work)
        L = max(eot_index) + 1
        token_ids = torch.tensor([ids + [0] * (L - len(ids)) for ids in rows], device=device)  # (C, L)
        with torch.no_grad():
            emb = clip.token_embedding(token_ids).float()  # (C, L, W)
            shape = (M, emb.shape[-1]) if shared else (len(classnames), M, emb.shape[-1])
            if ctx_init:
                init = clip.token_embedding(torch.tensor(init_ids, device=device)).float()  # (M, W)
                ctx = init.expand(shape).clone()  # (C, M, W), or (M, W) shared
            else:
                ctx = torch.randn(shape, generator=generator).to(device) * 0.02  # (C, M, W), or (M, W) shared
        self.n_ctx, self.full_context = M, False
        self.ctx = nn.Parameter(ctx)  # (C, M, W), or (M, W) shared
        # frozen pieces, rebuilt from CLIP on load, so not saved in checkpoints
        self.register_buffer("token_ids", token_ids, persistent=False)  # (C, L)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, W) SOT
        self.register_buffer("suffix", emb[:, 1 + M:].clone(), persistent=False)  # (C, L-1-M, W)
        self.register_buffer("eot_index", torch.tensor(eot_index, device=device), persistent=False)  # (C,)

    def embeddings(self):
        """Token embeddings of the prompts (without positional embeddings): (C, L, W)."""
        dtype = self.clip.token_embedding.weight.dtype
        ctx = self.ctx.expand(self.prefix.shape[0], -1, -1)  # (C, M, W): a shared context serves every class
        return torch.cat([self.prefix, ctx, self.suffix], dim=1).to(dtype)  # (C, L, W)

    def forward(self):
        x = self.embeddings()  # (C, L, W), L = max(EOT) + 1
        if self.full_context:  # a fast path off (bench's baseline): all 77 positions, as openai/CLIP runs them
            x = F.pad(x, (0, 0, 0, self.clip.context_length - x.shape[1]))  # (C, 77, W)
        # short_context=False: no data-dependent cut (int(eot.max())), so torch.compile sees one graph
        x = self.clip.encode_text_embeddings(x, self.eot_index, short_context=False)  # (C, D)
        return F.normalize(x.float(), dim=-1)  # (C, D) F_t, method (2)


# (3) the label graph comes from the frozen text encoder, not from the imbalanced training labels: tail classes
# get neighbours because their names are similar to others', not because they co-occur (they rarely do).
# `cooccur` and `identity` are the ablations.
GRAPH_MODES = ("text", "cooccur", "identity", "none")  # none: the GCN is frozen with W2 = 0, so F_hat = F_t


@torch.no_grad()
def zero_shot_text_features(clip, classnames, templates=("a photo of a {}.",), chunk=256):
    """g_c = normalize(mean_t normalize(E_T(template_t(name_c)))): plain CLIP's class embeddings, both the
    zero-shot baseline's classifier and the node features of the text graph."""
    device = clip.token_embedding.weight.device
    texts = [t.format(name.replace("_", " ")) for name in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), chunk):  # chunks bound the memory for 1000s of classes
        tokens = tokenize(texts[i:i + chunk], context_length=clip.context_length).to(device)
        feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))  # (n, D)
    feats = torch.cat(feats).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(feats.mean(dim=1), dim=-1)  # (C, D)


def reweight_graph(A, p):
    """P = (1 - p) I + p A: weight 1 - p on the class itself, p over its neighbours (ML-GCN's re-weighting,
    which stops over-smoothing). A's rows sum to 1, or are zero for a class with no neighbour: P's row is I's."""
    eye = torch.eye(len(A), dtype=A.dtype, device=A.device)
    has_neighbour = A.sum(dim=1, keepdim=True) > 0  # (C, 1)
    return torch.where(has_neighbour, (1 - p) * eye + p * A, eye)  # (C, C)


def topk_mask(S, k):
    """(C, C) bool: each row's k largest similarities, the class itself always among them (k = 0 or >= C: all)."""
    C = len(S)
    if k == 0 or k >= C:
        return torch.ones(C, C, dtype=torch.bool)
    first_self = S.masked_fill(torch.eye(C, dtype=torch.bool), float("inf"))  # (C, C)
    return torch.zeros(C, C, dtype=torch.bool).scatter_(1, first_self.topk(k, dim=1).indices, True)


def text_graph(S, s=10.0, p=0.2, topk=0, tau=0.0):
    """P from the text similarities S (C, C), over each row's top-k. tau = 0 (ours): A_ij = softmax_{j != i}(s S_ij),
    P = (1 - p) I + p A. tau > 0 (the pre-paper code): A = S with a zero diagonal, rows scaled to sum to p,
    diagonal 1 - p, then P = softmax(A / tau) over the kept entries of each row, the diagonal among them."""
    C, eye = len(S), torch.eye(len(S), dtype=torch.bool)
    keep = topk_mask(S, topk)  # (C, C)
    if tau == 0:
        logits = (s * S).masked_fill(eye | ~keep, float("-inf"))  # (C, C)
        A = torch.softmax(logits, dim=1).nan_to_num(0.0)  # (C, C); a class without neighbour (C = 1, k = 1): 0
        return reweight_graph(A, p)
    A = torch.where(keep & ~eye, S, 0.0)  # (C, C)
    A = p * A / A.sum(dim=1, keepdim=True).clamp(min=1e-12) + (1 - p) * eye.to(S.dtype)  # (C, C) rows sum to 1
    return torch.softmax((A / tau).masked_fill(~keep, float("-inf")), dim=1)  # (C, C)


def build_label_graph(mode, clip, classnames, train_targets, s=10.0, p=0.2, threshold=0.4, topk=0, tau=0.0):
    """The propagation matrix P (C, C), float32 on the CPU, rows summing to 1."""
    if mode == "text":  # S = G G^T: the cosine similarities of the g_c
        G = zero_shot_text_features(clip, classnames).double().cpu()  # (C, D)
        P = text_graph(G @ G.T, s, p, topk, tau)
    elif mode == "cooccur":
        if train_targets is None:
            raise ValueError("graph mode 'cooccur' needs the training labels (train_targets)")
        P = cooccur_graph(train_targets, p, threshold)
    elif mode in ("identity", "none"):
        P = torch.eye(len(classnames), dtype=torch.float64)
    else:  # a fork's own label graph
        P = read_graph_file(mode, len(classnames))
    return P.float()


class GCN(nn.Module):
    """(4) Three-layer residual GCN: H1 = LeakyReLU(P F_t W0), H2 = LeakyReLU(P H1 W1),
    F_hat = F_t + P H2 W2. W2 starts at zero, so the untrained GCN is the identity on F_t."""

    def __init__(self, dim, P, negative_slope=0.2, backend="auto", hidden=0, generator=None):
        super().__init__()
        H = hidden or dim  # the pre-paper code: D -> 2048 -> 2048 -> D
        self.register_buffer("P", torch.as_tensor(P, dtype=torch.float32).clone())  # (C, C)
        # our choice: W ~ N(0, 1/fan_in) keeps the feature norm roughly constant layer to layer
        self.W0 = nn.Parameter(torch.randn(dim, H, generator=generator) / math.sqrt(dim))  # (D, H)
        self.W1 = nn.Parameter(torch.randn(H, H, generator=generator) / math.sqrt(H))  # (H, H)
        self.W2 = nn.Parameter(torch.zeros(H, dim))  # (H, D) zero: F_hat = F_t at the start
        self.negative_slope, self.backend = negative_slope, backend

    def forward(self, F_t):
        kw = dict(negative_slope=self.negative_slope, backend=self.backend)
        H1 = graph_propagate(self.P, F_t, self.W0, activation=True, **kw)  # (C, H)
        H2 = graph_propagate(self.P, H1, self.W1, activation=True, **kw)  # (C, H)
        return F_t + graph_propagate(self.P, H2, self.W2, activation=False, **kw)  # (C, D) F_t + dF


def graph_propagate_reference(adj, x, weight, *, negative_slope=0.2, activation=True):
    """(4) One GCN propagation: act(adj @ (x @ weight)), act LeakyReLU(negative_slope) or none."""
    _check_propagate_args(adj, x, weight)
    out = adj @ (x @ weight)                               # (C, Dout)
    return F.leaky_relu(out, negative_slope) if activation else out


# (5) PEFT on the image tower: AdaptFormer in every ViT block, bias tuning on ResNets

def adapter_bottleneck(num_classes, num_layers):
    """LIFT's rule: r = 2^max(0, floor(log2(C / (2 L))))."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * num_layers))))


class AdaptFormer(nn.Module):
    """s_a * Up(ReLU(Down(LN_a(h)))), run in parallel with a block's MLP."""

    def __init__(self, width, r, generator=None):
        super().__init__()
        self.ln = nn.LayerNorm(width)  # LN_a
        self.down = nn.utils.skip_init(nn.Linear, width, r)  # nn.Linear's init, drawn from the model's generator:
        bound = 1 / math.sqrt(width)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        nn.init.uniform_(self.down.weight, -bound, bound, generator=generator)
        nn.init.uniform_(self.down.bias, -bound, bound, generator=generator)
        self.up = nn.utils.skip_init(nn.Linear, r, width)
        nn.init.zeros_(self.up.weight)  # zero: the adapted tower starts as the frozen one
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(()))  # s_a

    def forward(self, h):
        return self.scale * self.up(F.relu(self.down(self.ln(h))))


class AdaptedBlock(nn.Module):
    """A ViT block of OpenAI's with an AdaptFormer in parallel with its MLP: h = x + Attn(LN_1(x)),
    out = h + MLP(LN_2(h)) + s_a * Up(ReLU(Down(LN_a(h)))). It holds the block's own modules under their own
    names, so OpenAI's weights keep their names (their checkpoints still load) and only `adapter` is new."""

    def __init__(self, block, adapter):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = block.attn, block.ln_1, block.mlp, block.ln_2  # OpenAI's names
        self.causal, self.adapter = block.causal, adapter

    def forward(self, x):
        h = x + self.attn(self.ln_1(x), causal=self.causal)  # the residual stream after attention
        return h + self.mlp(self.ln_2(h)) + self.adapter(h)


def add_adaptformer(visual, num_classes, adapter_dim=0, generator=None):
    """Turn every block of a ViT image tower into an AdaptedBlock, in place -> the bottleneck r."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"AdaptFormer needs a ViT image tower, got {type(visual).__name__}")
    blocks, ref = visual.transformer.resblocks, visual.conv1.weight
    r = adapter_dim if adapter_dim > 0 else adapter_bottleneck(num_classes, len(blocks))
    for i, block in enumerate(blocks):
        blocks[i] = AdaptedBlock(block, AdaptFormer(ref.shape[0], r, generator).to(device=ref.device, dtype=ref.dtype))
    return r


def bias_tuning_parameters(visual):
    """ResNet bias tuning: every BatchNorm bias and the attention pool's projection biases."""
    pool = visual.attnpool
    norms = [m.bias for m in visual.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms + [pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias, pool.c_proj.bias]


# (6) the head: cosine logits at a trainable temperature; (9) what trains
LOGIT_SCALE_MAX = math.log(100.0)  # t <= ln(100), as in CLIP's training


class CAPNet(nn.Module):
    """logits z_c = exp(t) * cos(normalize(E_I(x)), F_hat_c), F_hat = GCN(PromptLearner()); P is the label graph."""

    def __init__(self, clip, classnames, P, *, n_ctx=16, ctx_init="", shared_ctx=False, train_gcn=True, gcn_hidden=0,
                 peft="adaptformer", adapter_dim=0, train_temperature=True, backend="auto", seed=0):
        super().__init__()
        if peft not in ("adaptformer", "none", "full"):
            raise ValueError(f"unknown peft {peft!r}; expected 'adaptformer', 'none' or 'full'")
        self.classnames = list(classnames)
        self.clip = clip.eval().requires_grad_(peft == "full")  # frozen (1) unless fully fine-tuned
        g = torch.Generator().manual_seed(seed)  # every random init (prompts, GCN, adapters); not the global RNG
        self.prompt_learner = PromptLearner(clip, classnames, n_ctx, ctx_init, shared_ctx, generator=g)
        self.gcn = GCN(clip.embed_dim, P, backend=backend, hidden=gcn_hidden, generator=g)
        self.gcn.to(clip.token_embedding.weight.device)
        self.gcn.requires_grad_(train_gcn)  # False (graph none: CoOp, LMPT): W2 = 0 stays, so F_hat = F_t exactly
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().float().clone())  # t
        self.logit_scale.requires_grad_(train_temperature)  # False: t frozen, as in the pre-paper code
        self.peft, self.adapter_dim = peft, 0  # adaptformer | bias | none | full
        if peft == "adaptformer" and isinstance(clip.visual, VisionTransformer):
            self.adapter_dim = add_adaptformer(clip.visual, len(classnames), adapter_dim, generator=g)
        elif peft == "adaptformer":  # the --peft adaptformer default means bias tuning on ResNets
            if adapter_dim:
                raise ValueError(f"--adapter-dim {adapter_dim} cannot act: a ResNet image tower has no adapters "
                                 f"(its PEFT is bias tuning)")
            self.peft = "bias"
            for param in bias_tuning_parameters(clip.visual):
                param.requires_grad_(True)
        self._text_cache = None  # (key, F_hat) in eval mode

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: BatchNorm keeps its running statistics even in training
        return self

    def trainable_parts(self):
        """Everything that trains (requires_grad), by part; "peft" is CLIP's share (all of it with --peft full). A new
        trainable submodule is an error until it has a part here (and so its group in build_optimizer)."""
        part_of = {"prompt_learner": "prompts", "gcn": "gcn", "logit_scale": "temperature", "clip": "peft"}
        parts = {part: [] for part in part_of.values()}
        for name, p in self.named_parameters():
            part = part_of.get(name.split(".")[0])  # by submodule
            if p.requires_grad and part is None:
                raise ValueError(f"trainable parameter {name!r} is in no part: add {name.split('.')[0]!r} to "
                                 f"CAPNet.trainable_parts, which gives each part its optimizer group")
            elif p.requires_grad:
                parts[part].append(p)
        return parts

    def clamp_temperature_(self):
        """Keep t <= ln(100) in the parameter itself (call after each optimizer step): the
        clamp in forward alone would leave t stuck above the bound with zero gradient."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=LOGIT_SCALE_MAX)

    def class_features(self):
        """F_hat = GCN(F_t) (C, D), (2)-(4); fixed in eval mode, so computed once there (fast paths)."""
        return self.gcn(self.prompt_learner()) if self.training else cached_class_features(self)

    def forward(self, images):
        return cosine_logits(self.clip.encode_image(images), self.class_features(), self.logit_scale)  # (B, C)


def cosine_logits(image_features, class_features, t):
    """(6) z_bc = exp(t) * cos(v_b, F_c), t clamped to ln(100): CAPNet's head, and plain CLIP's for zero-shot.
    The head is tiny, so it runs in fp32 even under autocast: logits and loss stay fp32."""
    with torch.autocast(image_features.device.type, enabled=False):
        v = F.normalize(image_features.float(), dim=-1)  # (B, D)
        F_hat = F.normalize(class_features.float(), dim=-1)  # (C, D)
        return t.float().clamp(max=LOGIT_SCALE_MAX).exp() * v @ F_hat.T  # (B, C)


def class_aware_weights(class_freq, tau_prime):
    """class_weight_c = C * softmax_c(-log(n_c) / tau'): rarer classes weigh more, the mean is 1; tau' = inf: all 1."""
    n = torch.as_tensor(np.asarray(class_freq), dtype=torch.float64)  # (C,) every n_c > 0 (load_prepared)
    if math.isinf(tau_prime):
        return torch.ones(len(n), dtype=torch.float32)
    return (len(n) * torch.softmax(-n.log() / tau_prime, dim=0)).float()  # (C,)


def db_focal_loss_reference(logits, targets, class_freq, num_images, *, alpha=0.1, beta=10.0,
                            mu=0.2, kappa=0.05, lam=2.0, gamma=2.0, gamma_neg=None, balance=2.0,
                            class_weight=None, reduction="mean"):
    """(7) Distribution-balanced focal loss with negative-tolerant regularisation (Wu et al. 2020, eqs. 3-6,
    with the focal factor of their released code; gamma_neg, the negatives' exponent if not gamma, from the pre-paper
    code). logits, targets: (B, C); class_freq: (C,) training counts n_c; num_images: N. Half types: in float32."""
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
    # focal term on the elementwise BCEWithLogits(z'', y), written out in its stable form:
    # F.binary_cross_entropy_with_logits takes log(1 + tiny) without log1p, losing a near-zero bce
    bce = z2.clamp(min=0) - z2 * y + torch.log1p(torch.exp(-z2.abs()))  # (B, C)
    one_minus_pt = -torch.expm1(-bce)                      # 1 - p_t, p_t = exp(-bce); no cancellation as p_t -> 1
    focal = one_minus_pt ** gamma                          # (B, C)
    if gamma_neg is not None and gamma_neg != gamma:       # the negatives' own exponent
        focal = torch.where(pos, focal, one_minus_pt ** gamma_neg)
    loss = balance * focal * w2 * bce                      # (B, C)
    if class_weight is not None:
        loss = loss * class_weight.to(dtype)               # (B, C) * (C,)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)


LOSSES = ("db-focal", "bce", "focal", "asl")


def make_criterion(cfg, class_freq, num_images):
    """fn(logits (B, C), targets (B, C)) -> scalar, the training loss chosen by cfg.loss."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {LOSSES}")
    if cfg.loss == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets)
    if cfg.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.gamma)
    if cfg.loss == "asl":
        return asymmetric_loss  # at its paper's settings: gamma+ 0, gamma- 4, margin 0.05
    freq = torch.as_tensor(np.asarray(class_freq), dtype=torch.float32)  # (C,)
    weight = class_aware_weights(freq, cfg.tau_prime)
    if (freq >= num_images).any():  # the NTR bias needs log(N / n_c - 1) finite; checked here, before any step
        c = int((freq >= num_images).nonzero()[0])
        raise ValueError(f"class {c} is in every training image ({int(freq[c])} of {num_images}): "
                         f"the DB-focal NTR bias log(N / n - 1) is undefined; use --loss bce or focal")

    # the focal factor is per element (7), as Wu et al.; LMPT's released code (dbl.py) takes it
    # from the batch-mean BCE, one scalar per batch: --method lmpt keeps the elementwise form
    def criterion(logits, targets):
        return db_focal_loss(logits, targets, freq.to(logits.device), num_images, alpha=cfg.alpha, beta=cfg.beta,
                             mu=cfg.mu, kappa=cfg.kappa, lam=cfg.lam, gamma=cfg.gamma, balance=cfg.balance,
                             gamma_neg=cfg.gamma_neg if cfg.gamma_neg >= 0 else cfg.gamma,
                             class_weight=weight.to(logits.device), backend=cfg.backend)
    return criterion


def tte_views(img, size, n_views=5):
    """(8) Test-time views -> (V, 3, size, size), the short side resized to round(size * 248 / 224):
    5 = four corners and centre (FiveCrop's order), 10 = those and their mirror images, 1 = the centre crop
    (ours: one of the five views, so TTE ablations differ in the number of views only)."""
    from PIL import Image
    if n_views not in (1, 5, 10):
        raise ValueError(f"n_views must be 1, 5 or 10, got {n_views}")
    img = resize_short_side(to_rgb(img), round(size * 248 / 224))
    W, H = img.size
    views = [center_crop(img, size)]
    if n_views > 1:  # the four corners (top left, top right, bottom left, bottom right), then the centre
        views = [crop(img, top, left, size) for top in (0, H - size) for left in (0, W - size)] + views
    if n_views == 10:
        views += [v.transpose(Image.FLIP_LEFT_RIGHT) for v in views]
    return torch.stack([to_tensor(v) for v in views])  # (V, 3, size, size)


def view_logits(forward, images: torch.Tensor) -> torch.Tensor:
    """(8) images (B, V, 3, S, S) -> logits averaged over the V test-time views."""
    B, V = images.shape[:2]
    return forward(images.flatten(0, 1)).float().view(B, V, -1).mean(1)  # (B * V, C) -> (B, C)


# Class statistics are always taken from the train split. Group rule of the
# VOC-LT / COCO-LT papers: head n >= 100, medium 20 <= n < 100, tail n < 20.
HEAD_MIN = 100
TAIL_MIN = 20

GROUPS = ("total", "head", "medium", "tail")  # the mAP columns of every report


def class_group(n):
    """'head' | 'medium' | 'tail' for a class with n training images."""
    return "head" if n >= HEAD_MIN else "medium" if n >= TAIL_MIN else "tail"


def average_precision(scores, targets):
    """Per-class average precision -> (C,) float64 tensor; NaN for a class with no positive. Exactly
    scikit-learn's average_precision_score (one class at a time): AP = sum_k (R_k - R_{k-1}) P_k over the
    distinct score thresholds, so tied scores enter as one step, with the precision of the whole tie group
    (no interpolation, no 11-point VOC rule)."""
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    targets = torch.as_tensor(targets).detach().to("cpu", torch.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, C)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0/1")
    s, order = torch.sort(scores, dim=0, descending=True, stable=True)  # (N, C)
    y = torch.gather(targets, 0, order)  # (N, C)
    precision = torch.cumsum(y, 0) / torch.arange(1, len(y) + 1, dtype=torch.float64)[:, None]  # (N, C)
    # a threshold sits at the last item of each run of tied scores, so rank i takes the precision of the
    # last rank scoring >= s_i: -s ascends down each column, and searchsorted finds that rank
    neg = -s.T.contiguous()  # (C, N)
    group_end = torch.searchsorted(neg, neg, right=True).T - 1  # (N, C)
    group_precision = torch.gather(precision, 0, group_end)  # (N, C)
    return (y * group_precision).sum(0) / y.sum(0)  # (C,) each positive adds 1/P of recall; no positive: 0/0 = NaN


def lt_map(ap, train_class_freq):
    """mAP in percent over all classes and the head / medium / tail groups of the train counts. Classes with
    NaN AP (no positive test image) are left out of every mean and counted in n_nan; a group with none left is NaN."""
    ap = torch.as_tensor(ap, dtype=torch.float64).cpu()
    freq = np.asarray(train_class_freq)
    if ap.ndim != 1 or freq.shape != (ap.shape[0],):
        raise ValueError(f"ap {tuple(ap.shape)} and train_class_freq {freq.shape} must both be (C,)")
    valid = ~torch.isnan(ap)
    groups = np.array([class_group(int(n)) for n in freq])

    def mean(mask):
        m = valid & torch.from_numpy(mask)
        return float(ap[m].mean() * 100) if m.any() else float("nan")

    out = {g: mean(groups == g) for g in ("head", "medium", "tail")}
    return {"total": mean(np.ones(len(freq), bool)), **out, "n_nan": int((~valid).sum())}


def build_optimizer(model: CAPNet, cfg: Config) -> torch.optim.Optimizer:
    """(9) One parameter group per trainable part, each with its peak lr and weight decay (none on the temperature
    and the adapter scales s_a). Deviation (ours): t trains at lr * temperature_lr_scale. At the full lr the first
    DB-focal steps, where every logit starts positive, drive exp(t) down and flatten the logits (docs/synthetic-lt.md,
    "The temperature's learning rate").
    --peft full: CLIP's own weights train at lr * clip_lr_scale (ours)."""
    parts = model.trainable_parts()
    scales = {id(m.scale) for m in model.clip.modules() if isinstance(m, AdaptFormer)}  # s_a
    prompt_decay = cfg.prompt_weight_decay if cfg.prompt_weight_decay >= 0 else cfg.weight_decay
    groups = [{"params": parts["prompts"], "weight_decay": prompt_decay},
              {"params": parts["gcn"], "lr": cfg.gcn_lr or cfg.lr},
              {"params": [p for p in parts["peft"] if id(p) not in scales],
               "lr": cfg.lr * cfg.clip_lr_scale if cfg.peft == "full" else cfg.lr},
              {"params": [p for p in parts["peft"] if id(p) in scales], "weight_decay": 0.0},
              {"params": parts["temperature"], "lr": cfg.lr * cfg.temperature_lr_scale, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # e.g. t frozen, no GCN, no adapters
    if cfg.optimizer == "adam":  # torch's Adam adds weight_decay * w to the gradient (L2, not AdamW's decoupled decay)
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_step(model, criterion, optimizer, scheduler, images, targets, amp=False, forward=None):
    """One step: logits (6), loss (7), backward, optimizer and schedule -> the loss, averaged over DDP processes.
    On a non-finite loss nothing moves: every process returns it and the caller stops. forward: model, or its
    DDP / compiled wrapper."""
    with autocast(images.device, amp):  # bf16 forward under --amp; the head, loss and master weights stay fp32
        logits = (forward or model)(images)  # (B, C)
    loss = criterion(logits.float(), targets.float())
    loss_value = loss.detach().clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss_value)
        loss_value /= torch.distributed.get_world_size()
    if torch.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_temperature_()  # t <= ln(100), (6)
        scheduler.step()
    return loss_value

# -----------------------------------------------------------------------------
# ablations and baselines: the co-occurrence graph (--graph cooccur), plain focal loss and ASL (--loss), one's own
# label graph (--graph FILE)

def cooccur_graph(targets, p, threshold=0.4):
    """ML-GCN: P(j|i) = n_ij / n_i from the training labels, >= threshold an edge, rows normalised; (1 - p) I + p A."""
    Y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)  # (N, C)
    n_ij = Y.T @ Y  # (C, C) co-occurrence counts
    n_i = n_ij.diagonal().clamp(min=1)  # a class with no image has no edge (0 / 1 = 0)
    B = (n_ij / n_i[:, None] >= threshold).double()  # (C, C) P(j | i) >= threshold
    B.fill_diagonal_(0)  # the self-loop is added by the (1 - p) I term
    A = B / B.sum(dim=1, keepdim=True).clamp(min=1)  # rows of 1s / degree, or all zero
    return reweight_graph(A, p)


def focal_loss(logits, targets, gamma=2.0):
    """Plain sigmoid focal loss, mean over B*C: (1 - p_t)^gamma * BCE (ablation)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, C)
    return ((1 - torch.exp(-bce)) ** gamma * bce).mean()


def asymmetric_loss(logits, targets, gamma_pos=0.0, gamma_neg=4.0, clip=0.05):
    """ASL (Ridnik et al. 2021): -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0), log clamped
    at 1e-8 as in their code; mean over B*C like every loss here (their code sums); gradients flow everywhere."""
    p = torch.sigmoid(logits)  # (B, C)
    p_m = (p - clip).clamp(min=0)  # (B, C) shifted probability: easy negatives (p <= clip) cost nothing
    pos = (1 - p) ** gamma_pos * torch.log(p.clamp(min=1e-8))  # (B, C)
    neg = p_m ** gamma_neg * torch.log((1 - p_m).clamp(min=1e-8))  # (B, C)
    return -(targets * pos + (1 - targets) * neg).mean()


def read_graph_file(path, num_classes):
    """--graph FILE: a C x C matrix P of one's own (.npy; .pt, a tensor; .txt, C lines of C numbers), finite and
    non-negative; each row is divided by its sum, so rows sum to 1 as every P here."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            P = np.load(path, allow_pickle=False)
        elif path.suffix == ".pt":
            P = torch.load(path, map_location="cpu", weights_only=True)
        else:
            P = np.loadtxt(path, ndmin=2)
        P = torch.as_tensor(np.asarray(P), dtype=torch.float64)  # (C, C)
    except Exception as e:  # missing, not a matrix, not numbers ...
        raise ValueError(f"--graph {str(path)!r}: cannot read a matrix from it ({type(e).__name__}: {e})") from None
    if P.shape != (num_classes, num_classes):
        raise ValueError(f"--graph {str(path)!r}: a {tuple(P.shape)} matrix, but the data set has {num_classes} classes")
    if not torch.isfinite(P).all() or (P < 0).any() or (P.sum(1) == 0).any():
        raise ValueError(f"--graph {str(path)!r}: entries must be finite and non-negative, each row with a positive sum")
    return P / P.sum(1, keepdim=True)  # (C, C)

# -----------------------------------------------------------------------------
# vendored CLIP (OpenAI, MIT): tokenizer, model, checkpoint loader

# Byte-level BPE exactly as OpenAI CLIP's SimpleTokenizer (same clean-up, regex and merges), re-implemented
# here. The merges file bpe_simple_vocab_16e6.txt.gz (MIT, OpenAI) is vendored at the repository root.
BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|>


class SimpleTokenizer:
    def __init__(self, bpe_path=BPE_PATH):
        import regex
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")  # the file ships with this repository
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48894 merges
        # GPT-2's reversible byte -> printable character map: printable latin-1 as itself, the rest 256, 257, ...
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        extra = [b for b in range(256) if b not in keep]
        self.byte_encoder = {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}
        byte_chars = list(self.byte_encoder.values())
        # vocab order fixes the ids: 256 bytes, 256 word-final bytes, merges, SOT, EOT
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}
        self.spaces = regex.compile(r"\s+")
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                     r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, word):
        """Merge the symbols of one pre-token, lowest-rank pair first, until no pair is a merge."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols[:-1], symbols[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged = []
            for s in symbols:  # every occurrence of `best`, left to right (a fresh merge never equals best[0])
                if merged and (merged[-1], s) == best:
                    merged[-1] += s
                else:
                    merged.append(s)
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        import ftfy
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # OpenAI's basic_clean
        ids = []
        for piece in self.pattern.findall(self.spaces.sub(" ", text).strip().lower()):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids


@functools.lru_cache()
def _tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """texts -> LongTensor (n, context_length): [SOT] bpe(text) [EOT] 0 0 ... A text longer than the context
    is an error, or with truncate=True cut so that its last kept token is EOT (OpenAI's behaviour)."""
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT] + _tokenizer().encode(text) + [EOT]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"text is {len(ids)} tokens, longer than the context length "
                                   f"{context_length} (pass truncate=True to cut it): {text!r}")
            ids = ids[:context_length - 1] + [EOT]
        out[row, :len(ids)] = torch.tensor(ids)
    return out


# OpenAI's CLIP with their module and parameter names (their checkpoints load with strict=True). Deviations from
# openai/CLIP's model.py, none changing a number beyond float rounding: batch-first (B, L, D); SDPA instead of
# nn.MultiheadAttention (MultiheadAttention.attend, which the fast paths may specialise); positional embeddings
# resized for other input sizes; encode_text runs on the shortest causal context holding every EOT; fp32 (no fp16
# conversion); no forward(images, texts) and no from-scratch initialisation (weights come from a checkpoint; OpenAI's
# init, for the synthetic world, is in data_prep.py). Nothing of CAPNet's is here: the method attaches its adapters
# (add_adaptformer) and the runs install the fast paths (install_fast_paths) from outside.

class Bottleneck(nn.Module):
    """Anti-aliased ResNet bottleneck: stride s is an s x s average pool (after conv2; before the downsample conv)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # OpenAI names the pool "-1" so the conv and norm keep the keys "0" and "1"
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def resize_pos_embed(pos, grid_hw):
    """pos (1 + g*g, W): a class/pooled-token row, then a g x g grid -> (1 + h*w, W) for grid (h, w): the
    grid interpolated bicubically, the first row kept; at the native grid, the checkpoint's own."""
    g = round((pos.shape[0] - 1) ** 0.5)
    if tuple(grid_hw) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    grid = F.interpolate(grid.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(-1, pos.shape[1])  # (h*w, W)
    return torch.cat([pos[:1], grid])


def _heads(x, n_head):
    B, L, W = x.shape
    return x.view(B, L, n_head, W // n_head).transpose(1, 2)  # (B, H, L, W/H)


class AttentionPool2d(nn.Module):
    """ResNet head: the feature map's mean queries itself and the H*W positions (learned position embeddings)."""

    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+HW, C)
        x = x + resize_pos_embed(self.positional_embedding, (H, W)).to(x.dtype)
        q = _heads(self.q_proj(x[:, :1]), self.num_heads)  # (B, h, 1, C/h)
        k = _heads(self.k_proj(x), self.num_heads)  # (B, h, 1+HW, C/h)
        v = _heads(self.v_proj(x), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, C/h)
        return self.c_proj(out.transpose(1, 2).reshape(B, C))  # (B, D)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem and average pool, anti-aliased bottlenecks, an attention pool (no GAP)."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x.to(self.conv1.weight.dtype))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, width, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, S/32, S/32)
        return self.attnpool(x)  # (B, D)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (q, k, v packed in in_proj_*; out_proj), computed batch-first by SDPA."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal=False):
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, W)
        out = self.attend(_heads(q, self.n_head), _heads(k, self.n_head), _heads(v, self.n_head), causal)  # (B, H, L, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))

    def attend(self, q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, W/H)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, causal=False):
        super().__init__()
        self.causal = causal  # text tower: each position sees itself and the positions before it
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d_model, d_model * 4), gelu=QuickGELU(),
                                             c_proj=nn.Linear(d_model * 4, d_model)))
        self.ln_2 = nn.LayerNorm(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)  # (B, L, W)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, W, S/p, S/p)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(self.positional_embedding, grid).to(x.dtype)
        x = self.transformer(self.ln_pre(x))  # (B, 1+g*g, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, D)


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.context_length, self.vocab_size, self.embed_dim = context_length, vocab_size, embed_dim
        if isinstance(vision_layers, (tuple, list)):
            # OpenAI's convention: 64-dim heads over the 32*width attention-pool features
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64,
                                         image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                            vision_layers, vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.zeros(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):
        return self.visual(images.to(self.dtype))  # (B, D)

    def encode_text(self, tokens, short_context=True):
        """tokens (n, L) from tokenize() -> (n, D), read at each sequence's EOT (its largest id)."""
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens.argmax(dim=-1), short_context)

    def encode_text_embeddings(self, x, eot_index, short_context=True):
        """x (n, L, W) token embeddings without positions (prompts splice their context in here), eot_index (n,) ->
        (n, D). The mask is causal: short_context=True runs only x[:, :max(eot)+1], the same features."""
        if short_context:
            x = x[:, :int(eot_index.max()) + 1]
        x = x.to(self.dtype) + self.positional_embedding[:x.shape[1]].to(self.dtype)  # (n, L, W)
        x = self.ln_final(self.transformer(x))  # (n, L, W)
        return x[torch.arange(len(x), device=x.device), eot_index] @ self.text_projection  # (n, D)


def build_clip(state_dict):
    """OpenAI-layout state dict -> CLIP in fp32, eval mode; sizes read from tensor shapes, 64 dims per head."""
    ints = ("input_resolution", "context_length", "vocab_size")  # not parameters: ints in OpenAI's archives
    sd = {k: v for k, v in state_dict.items() if k not in ints}
    for key in ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
                "visual.conv1.weight"):
        if key not in sd:
            raise KeyError(f"not a CLIP state dict: missing '{key}'")
    if "visual.proj" in sd:  # ViT
        vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        image_resolution = patch * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)  # patch * grid
    else:  # ResNet
        vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")})
                              for i in (1, 2, 3, 4))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        patch, image_resolution = None, 32 * round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    width = sd["ln_final.weight"].shape[0]
    n_text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    with torch.device("meta"):  # no memory and no random init: every tensor comes from sd
        model = CLIP(embed_dim=sd["text_projection"].shape[1], image_resolution=image_resolution,
                     vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=patch,
                     context_length=sd["positional_embedding"].shape[0],
                     vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=width,
                     transformer_heads=width // 64, transformer_layers=n_text_layers)
    # fp32 copies (OpenAI ships fp16; a copy also keeps the caller's tensors out of the model)
    sd = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval()


_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models"
# name -> url; the second-to-last path component is the file's SHA-256, as OpenAI publishes it
KNOWN_MODELS = {
    "RN50": f"{_OPENAI_URL}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_OPENAI_URL}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_OPENAI_URL}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_OPENAI_URL}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_OPENAI_URL}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_OPENAI_URL}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_OPENAI_URL}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_OPENAI_URL}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_OPENAI_URL}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def clip_cache_dir(download_root=None):
    return Path(download_root or "~/.cache/clip").expanduser()


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url, dst):
    """Stream url into the open binary file dst. (A seam: tests replace it to stay offline.)"""
    import urllib.request
    with urllib.request.urlopen(url, timeout=60) as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)


def _download(name, root):
    """Known model name -> verified file root/<file>: downloaded to a temporary file, renamed into place only
    after its SHA-256 matches, so the cache never holds a partial or wrong file."""
    url = KNOWN_MODELS[name]
    sha, filename = url.split("/")[-2:]
    target = root / filename
    if target.is_file():
        if _sha256(target) == sha:
            return target, sha
        print(f"{target} exists but its SHA-256 does not match {sha}; downloading it again", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{filename}.{os.getpid()}.part"
    try:
        with open(tmp, "wb") as f:
            _fetch(url, f)
        got = _sha256(tmp)
        if got != sha:
            raise RuntimeError(f"downloaded {url} but its SHA-256 is {got}, expected {sha}; "
                               f"nothing was written to {target}")
        os.replace(tmp, target)
    except OSError as e:  # offline, DNS, HTTP errors (URLError is an OSError)
        raise RuntimeError(f"CLIP model '{name}' is not in the cache and could not be downloaded "
                           f"({e}). Offline? Download {url} elsewhere and put it at {target} "
                           f"(SHA-256 {sha}), or pass a checkpoint path instead of a name.") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target, sha


def load_clip(name_or_path, device="cpu", download_root=None):
    """A known model name (cached in ~/.cache/clip; downloaded, SHA-256 checked) or the path of a TorchScript archive
    (OpenAI's format) or a state dict -> CLIP (fp32, eval), model.source = {"name", "sha256"} of the weights."""
    import zipfile
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if name_or_path in KNOWN_MODELS:
        path, sha = _download(name_or_path, clip_cache_dir(download_root))
    elif path.is_file():
        sha = _sha256(path)
    else:
        raise FileNotFoundError(f"CLIP model '{name_or_path}' is neither a file nor a known model "
                                f"name ({', '.join(KNOWN_MODELS)})")
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            import warnings
            with warnings.catch_warnings():  # torch.jit is deprecated (Deprecation- or FutureWarning by torch
                warnings.simplefilter("ignore")  # version), but it is OpenAI's format
                sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read CLIP checkpoint {path}: the file is truncated, corrupted or not "
                           f"a TorchScript archive / state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) or isinstance(v, int) for v in sd.values()):
        raise RuntimeError(f"CLIP checkpoint {path} does not hold a state dict (a dict of tensors)")
    try:
        model = build_clip(sd)
    except (KeyError, RuntimeError) as e:
        raise RuntimeError(f"cannot build CLIP from {path}: {e}") from e
    model.source = {"name": name_or_path, "sha256": sha}
    return model.to(device)

# -----------------------------------------------------------------------------
# images: decoding, resize, crops (PIL and numpy, no torchvision)

# Written with PIL, numpy and torch (no torchvision). resize_short_side + center_crop + to_tensor reproduce
# OpenAI's CLIP transform (torchvision Resize(size, BICUBIC) of the short side, CenterCrop, RGB, ToTensor,
# Normalize) on PIL images, whose BICUBIC resize antialiases when shrinking.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_ASPECT = 10  # longest side / shortest side that reaches the resize (VOC and COCO stay below)


def load_rgb(path, exif=False):
    """Image file -> 8-bit RGB, decoded now (a truncated file or a decompression bomb fails here, by name). exif=True
    (predict) turns photos as viewers do; train and eval keep stored pixels, as openai/CLIP's preprocess did."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img) if exif else img)
    except Exception as e:  # missing, unreadable, truncated, not an image, decompression bomb
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def to_rgb(img):
    """PIL image of any mode -> 8-bit RGB. I;16* and I hold 16-bit values, scaled by 1/257 (Pillow's
    own conversion clips them: white); F keeps Pillow's 0..255. Transparency is composited on white."""
    from PIL import Image
    if img.mode[0] in "IF":
        a = np.asarray(img, dtype=np.float64) / (257 if img.mode[0] == "I" else 1)  # (H, W)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(img):
    """PIL RGB (W x H) -> (3, H, W) float32, CLIP-normalised."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_short_side(img, size):
    """Bicubic resize so the short side is `size`; the long side is floored as torchvision does. Only its
    centre MAX_ASPECT x short side is kept: a 20000 x 10 panorama costs no 496,000 x 248 image."""
    from PIL import Image
    w, h = img.size
    cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)  # (w, h) for any sane image
    new_w, new_h = (size, int(size * ch / cw)) if cw <= ch else (int(size * cw / ch), size)
    return img.resize((new_w, new_h), Image.BICUBIC, box=((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))


def crop(img, top, left, size):
    return img.crop((left, top, left + size, top + size))


def center_crop(img, size):
    w, h = img.size
    return crop(img, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size)  # torchvision rounding


def train_augment(img, size, rng, scale=(0.5, 1.0)):
    """Random resized crop (torchvision's sampling: area in `scale`, log-uniform aspect in [3/4, 4/3], ten tries,
    then a centre fallback), bicubic, flip with p = 0.5; all randomness from `rng`: (seed, epoch, index) fix it."""
    from PIL import Image
    img = to_rgb(img)
    W, H = img.size
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:  # fallback: the whole image, cut to an aspect ratio inside [3/4, 4/3], centred
        w, h = min(W, int(round(H * 4 / 3))), min(H, int(round(W * 4 / 3)))
        top, left = (H - h) // 2, (W - w) // 2
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)

# -----------------------------------------------------------------------------
# data: the prepared format, datasets, batches

@dataclass
class Prepared:
    """A prepared dataset (data/<name>/dataset.json, written by data_prep.py), validated."""
    name: str
    classes: list          # class names, index order
    image_root: Path       # absolute folder the relative image paths hang from
    train: list            # [(relpath, [label indices]), ...]
    test: list
    source: dict           # how it was made (free form, from data_prep)


def _check_items(items, split, classes, json_path):
    # every item is [relpath, [distinct int labels in range]]; no image twice
    seen, out = set(), []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (list, tuple))):
            raise ValueError(f"{json_path}: {split}[{i}] is not [relpath, [labels]]: {item!r:.80}")
        relpath, labels = item
        if relpath in seen:
            raise ValueError(f"{json_path}: duplicate image {relpath!r} in {split}")
        seen.add(relpath)
        for label in labels:
            if type(label) is not int:  # JSON's true and false are ints to isinstance
                raise ValueError(f"{json_path}: {split} image {relpath!r} has a non-integer label {label!r}")
            if not 0 <= label < len(classes):
                raise ValueError(f"{json_path}: {split} image {relpath!r} has label {label}, "
                                 f"out of range for {len(classes)} classes (0..{len(classes) - 1})")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{json_path}: {split} image {relpath!r} repeats a label: {labels}")
        out.append((relpath, list(labels)))
    return out, seen


def load_prepared(path):
    """Read and validate a dataset.json; every error names the bad thing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prepared dataset at {path} (make it with data_prep.py, see README)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [key for key in ("name", "classes", "image_root", "train", "test") if key not in d]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    classes = d["classes"]
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{path}: empty class list")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{path}: class {i} has no name: {c!r}")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate class name(s) {dup}")
    (train, train_set), (test, test_set) = (_check_items(d[s], s, classes, path) for s in ("train", "test"))
    if not train or not test:
        raise ValueError(f"{path}: the {'train' if not train else 'test'} split is empty")
    both = sorted(train_set & test_set)
    if both:
        raise ValueError(f"{path}: {len(both)} image(s) in both train and test, e.g. {both[0]!r}")
    # the DB loss needs n_c > 0 (r_bc = (1/n_c) / ...), and AP of an unseen class says nothing
    counts = class_counts(train, len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"{path}: class {empty[0]!r} has no training image"
                         + (f" (also {empty[1:]})" if len(empty) > 1 else ""))
    root = path.parent / d["image_root"]  # relative roots hang from the json's folder, absolute ones replace it
    return Prepared(name=d["name"], classes=list(classes), image_root=root.resolve(),
                    train=train, test=test, source=d.get("source", {}))


def multihot(items, num_classes):
    """[(relpath, labels)] -> (N, C) float32 0/1 targets."""
    y = np.zeros((len(items), num_classes), np.float32)  # (N, C)
    for i, (_, labels) in enumerate(items):
        y[i, list(labels)] = 1.0
    return y


def class_counts(items, num_classes):
    """n_c: number of images carrying class c -> (C,) int64."""
    return multihot(items, num_classes).sum(axis=0, dtype=np.int64)


def format_class_stats(classes, counts, num_images=None):
    """Readable class statistics: images, classes, head/medium/tail sizes, per-class counts."""
    counts, groups = np.asarray(counts), [class_group(int(n)) for n in counts]
    width = max(len(c) for c in classes)
    lines = [f"images: {num_images}"] if num_images is not None else []
    lines += [f"classes: {len(classes)}  (head n>={HEAD_MIN}: {groups.count('head')}, medium {TAIL_MIN}<=n<{HEAD_MIN}: "
              f"{groups.count('medium')}, tail n<{TAIL_MIN}: {groups.count('tail')})",
              f"labels per class: max {counts.max()}, median {int(np.median(counts))}, min {counts.min()}, "
              f"imbalance {counts.max() / max(counts.min(), 1):.1f}"]
    lines += [f"  {i:4d} {classes[i]:<{width}} {counts[i]:7d}  {groups[i]}" for i in np.argsort(-counts, kind="stable")]
    return "\n".join(lines)


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images and multi-hot targets. mode="train": train_augment, a (3, S, S) tensor per item drawn from
    np.random.default_rng([seed, epoch, index]), so a resumed run sees the same crops; mode="eval": tte_views,
    (V, 3, S, S). skip_bad: an unreadable image gives None (dropped by collate_skip_bad) and counts in
    bad_count (shared with DataLoader workers) instead of an error naming the file."""

    def __init__(self, items, image_root, num_classes, size, mode="train", n_views=5,
                 scale_min=0.5, seed=0, skip_bad=False):
        self.items, self.image_root = list(items), Path(image_root)
        self.targets = multihot(self.items, num_classes)  # (N, C)
        self.size, self.mode, self.n_views = size, mode, n_views
        self.scale_min, self.seed, self.skip_bad = scale_min, seed, skip_bad
        self.epoch = 0  # train crops are drawn per (seed, epoch, index): the train loop sets it
        # a shared counter: with DataLoader workers each process holds its own copy of the dataset
        self._bad = torch.multiprocessing.get_context().Value("i", 0) if skip_bad else None

    @property
    def bad_count(self):
        return self._bad.value if self._bad is not None else 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        try:
            img = load_rgb(self.image_root / self.items[index][0])
        except Exception as e:
            if not self.skip_bad:
                raise
            with self._bad.get_lock():
                self._bad.value += 1
            print(f"warning: skipped (--skip-bad-images): {e}", file=sys.stderr)
            return None
        if self.mode == "train":
            rng = np.random.default_rng([self.seed, self.epoch, index])
            x = train_augment(img, self.size, rng, scale=(self.scale_min, 1.0))  # (3, S, S)
        else:
            x = tte_views(img, self.size, self.n_views)  # (V, 3, S, S)
        return x, torch.from_numpy(self.targets[index]), index


def collate_skip_bad(batch):
    """Default collation without the None items of bad images; None when the whole batch is bad."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def sampler_weights(targets, class_freq, power: float = 1.0):
    # Class-aware re-sampling: image i is drawn with probability proportional to sum_c y_ic n_c^-q. q = 1 is the
    # per-image marginal of Shen et al.'s (a class uniformly, then one of its images), as in Wu et al. 2020.
    inv = np.maximum(np.asarray(class_freq, dtype=np.float64), 1) ** -power  # (C,) n_c^-q
    w = np.asarray(targets, dtype=np.float64) @ inv  # (N,)
    return w / w.sum()


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  weights=None):
    # The global batches of one epoch (drop_last; batch_size is global), each cut to this process's shard.
    # The order depends only on (seed, epoch), so a resumed run and every DDP process see the same batches;
    # the extra words keep this stream apart from the augmentation RNG [seed, epoch, index]. With `weights`
    # (class-aware sampler) an epoch is num_items draws with replacement: as many steps as uniform.
    rng = np.random.default_rng([seed, epoch, 2**32 - 1, 1])
    order = rng.permutation(num_items) if weights is None else rng.choice(num_items, num_items, p=weights)
    steps = num_items // batch_size
    return [order[i * batch_size:(i + 1) * batch_size][rank::world].tolist() for i in range(steps)]

# -----------------------------------------------------------------------------
# fast paths: every speed switch, the dispatch to the fused C++/CUDA ops of csrc/, and their first-use check

# importing capnet_ext registers torch.ops.capnet.*
capnet_ext, _EXT_WHY_NOT = None, "disabled by CAPNET_NO_EXT=1"
if os.environ.get("CAPNET_NO_EXT") != "1":
    try:  # build_ext --inplace puts it beside this file, which is on sys.path when capnet imports
        import capnet_ext
    except ModuleNotFoundError:
        _EXT_WHY_NOT = "not built"
    except (ImportError, OSError) as e:  # e.g. built against another torch
        _EXT_WHY_NOT = f"import failed: {e}"
EXT_AVAILABLE = capnet_ext is not None
EXT_CUDA = EXT_AVAILABLE and bool(getattr(capnet_ext, "WITH_CUDA", False))
BUILD_HINT = "python setup.py build_ext --inplace"
FUSED_OPS = ("db_focal_loss", "graph_propagate", "quick_gelu")


def install_fast_paths(model, backend="auto", shortest_text_context=True, matmul_attention_bf16_cpu=True):
    """Set every speed switch of a CAPNet or a bare CLIP, in place -> model. None changes a number beyond float
    rounding (bench.py times each against its baseline). backend (auto | ext | torch): the fused QuickGELU and GCN
    propagation (the loss takes cfg.backend itself); shortest_text_context: the prompts run on max(EOT) + 1
    positions, not all 77; matmul_attention_bf16_cpu: bf16 attention on the CPU in the matmul form, not by SDPA."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (QuickGELU, FusedQuickGELU):
                setattr(module, name, FusedQuickGELU(backend))
        if type(module) in (MultiheadAttention, MatmulAttentionBF16CPU):  # no state of its own: the weights stay
            module.__class__ = MatmulAttentionBF16CPU if matmul_attention_bf16_cpu else MultiheadAttention
        if isinstance(module, PromptLearner):
            module.full_context = not shortest_text_context
        if isinstance(module, GCN):
            module.backend = backend
    return model


class FusedQuickGELU(QuickGELU):
    """QuickGELU by the quick_gelu dispatcher: capnet::quick_gelu (one pass, float32 math, rounded once to the input's
    dtype) or, with backend torch, the reference."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.backend = backend

    def forward(self, x):
        return quick_gelu(x, backend=self.backend)


def matmul_attention(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v  # (B, H, L, d)


class MatmulAttentionBF16CPU(MultiheadAttention):
    """SDPA, but for bf16 on the CPU, where its flash backward is slower than the matmul form at ViT-B/16's sizes
    (docs/speed.md)."""

    def attend(self, q, k, v, causal):
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not causal:
            return matmul_attention(q, k, v)  # (B, H, L, d)
        return super().attend(q, k, v, causal)


def hold_frozen_in_bf16(clip):
    """Under bf16 autocast, hold the frozen GEMM weights in bf16 once (autocast caches only casts of weights that
    require grad): exactly the tensors autocast rounds (Linear, attention in-projection, ResNet convs after the
    stem, output projections), so outputs are unchanged; norms, embeddings and trainable parameters stay fp32."""
    convs = [m for m in clip.visual.modules() if isinstance(m, nn.Conv2d) and m is not clip.visual.conv1]
    modules = [m for m in clip.modules() if isinstance(m, (nn.Linear, MultiheadAttention))] + convs
    params = [p for m in modules for p in m.parameters(recurse=False)] + [clip.text_projection]
    params += [clip.visual.proj] if isinstance(clip.visual, VisionTransformer) else []
    for p in params:
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def cached_class_features(model):
    """F_hat in eval mode, where the prompts are fixed: computed once, keyed by the storage and version counter of
    every parameter and buffer of the model (a state dict load, optimizer step or device move recomputes it; a
    fork's new input of F_hat is covered without a list to update) and the autocast state."""
    autocast = torch.is_autocast_enabled(model.logit_scale.device.type)
    key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers())) + (autocast,)
    if model._text_cache is None or model._text_cache[0] != key:
        with torch.no_grad():
            model._text_cache = (key, model.gcn(model.prompt_learner()))
    return model._text_cache[1]


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    # master weights, loss and metrics stay fp32; only the forward runs in bf16
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def _use_ext(backend, device, op):
    if backend == "torch":
        return False
    if backend not in ("auto", "ext"):
        raise ValueError(f"{op}: backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    has_kernel = EXT_AVAILABLE and (device.type == "cpu" or (device.type == "cuda" and EXT_CUDA))
    if backend == "ext" and not has_kernel:
        raise RuntimeError(f"{op}: backend='ext' but capnet_ext cannot run here ({_why_no_kernel(device)}); "
                           f"build it with: {BUILD_HINT}, or use backend='torch'")
    return has_kernel


def _why_no_kernel(device):
    return f"extension {_EXT_WHY_NOT}" if not EXT_AVAILABLE else f"extension built without {device.type} kernels"


@functools.lru_cache(maxsize=None)
def _say_once(message):
    print(message, file=sys.stderr)


# First-use check. Kernels that no test here could run (the CUDA ones above all) check themselves where they run: the
# first time an op's kernel serves a (device type, dtype) in this process, its reference runs on the same inputs, and
# values and gradients are compared at the tests' tolerance. A mismatch warns once and hands that (op, device type,
# dtype) to the reference for the rest of the process: never a wrong model trained quietly.
FIRST_USE = {}  # (op, device type, dtype) -> None (the kernel matched its reference) or the mismatch, in words
OPS_RAN = {}  # (op, device type, dtype) -> what served it last: "extension, verified" or "reference (why)"
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
TINY = {dtype: torch.finfo(dtype).smallest_normal for dtype in RTOL}  # below it a half type has no relative precision
WIDEN = {"db_focal_loss", "quick_gelu"}  # kernels with float32 math for half inputs: checked against fp32 references


def run_fused(op, backend, kernel, reference, inputs, covered=True, check_on=None):
    """kernel(*inputs) where the extension has a kernel for the inputs' device that passed its first-use check there,
    else reference(*inputs). inputs: the tensors the op is differentiated by (kernel and reference bind the rest);
    covered=False: the kernel cannot compute this call; check_on() -> the inputs of the first-use check if not these."""
    x = inputs[0]
    key = (op, x.device.type, str(x.dtype).removeprefix("torch."))
    use_kernel = _use_ext(backend, x.device, op) and covered
    traced = torch.compiler.is_compiling() or x.device.type == "meta" or isinstance(x, torch._subclasses.FakeTensor)
    if use_kernel and key not in FIRST_USE and not traced and x.numel():  # an empty input has nothing to compare
        FIRST_USE[key] = compare_with_reference(kernel, reference, check_on() if check_on else inputs, op in WIDEN)
        if FIRST_USE[key]:
            warnings.warn(f"capnet: the extension's {op} on {key[1]} {key[2]} does not match its pure-torch reference "
                          f"({FIRST_USE[key]}); the reference runs it there for the rest of this process")
    use_kernel = use_kernel and not FIRST_USE.get(key)
    if not traced:
        checked = "verified" if key in FIRST_USE else "not yet checked (empty input)"
        OPS_RAN[key] = f"extension, {checked}" if use_kernel else f"reference ({_why_reference(backend, x.device, key)})"
        if not EXT_AVAILABLE and backend == "auto":
            _say_once(f"capnet: fused-op extension capnet_ext {_EXT_WHY_NOT}; using the pure-torch path "
                      f"(build it with: {BUILD_HINT})")
    return kernel(*inputs) if use_kernel else reference(*inputs)


def _why_reference(backend, device, key):
    if backend == "torch":
        return "--backend torch"
    if not _use_ext(backend, device, key[0]):
        return _why_no_kernel(device)
    return f"extension mismatch: {FIRST_USE[key]}" if FIRST_USE.get(key) else "the kernel does not cover this call"


def compare_with_reference(kernel, reference, inputs, widen=False):
    """None if kernel and reference agree on inputs, in value and in the gradient of each input (a seeded random
    upstream gradient), within RTOL of the inputs' dtype times the reference's largest magnitude (+ TINY); else the
    largest error (or the kernel's exception, where the reference runs), in words. widen: for half types the
    reference runs on the inputs in float32, the exact value the kernel rounds once; otherwise in their dtype
    (GEMMs round in it on both sides)."""
    dtype, device = inputs[0].dtype, inputs[0].device
    wide = torch.float32 if widen and dtype in (torch.bfloat16, torch.float16) else dtype

    def run(fn, as_dtype):  # [output, gradient of each input]
        leaves = [t.detach().to(as_dtype).clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        upstream = upstream.to(device, dtype).to(out.dtype)  # the same rounded values for both
        grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
        return [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        try:
            results = [run(kernel, dtype)]
        except Exception as kernel_error:  # bad input, or a broken kernel: the reference tells which
            try:
                run(reference, wide)
            except Exception:
                raise kernel_error from None  # bad input: the kernel's own message names it
            return f"the kernel raised {type(kernel_error).__name__}: {str(kernel_error).strip().splitlines()[0]}"
        results.append(run(reference, wide))
    worst, where = 0.0, "value"
    for i, (got, want) in enumerate(zip(*results)):
        name, got, want = "value" if i == 0 else f"gradient of input {i - 1}", got.double(), want.double()
        if not torch.equal(got.isnan(), want.isnan()):
            return f"the {name} is NaN where the reference's is not, or the reverse"
        scale = max(want.nan_to_num().abs().max().item(), TINY[dtype] / RTOL[dtype])
        error = (got - want).nan_to_num().abs().max().item() / scale
        if error > worst:
            worst, where = error, name
    return None if worst <= RTOL[dtype] else f"largest error {worst:.2e} of the {where} (tolerance {RTOL[dtype]:.0e})"


def ops_report() -> dict:
    """{op: what ran it on each device and dtype so far}, e.g. "extension, verified on cpu float32": the run's log and
    results.json say what served each fused op, not what was asked for."""
    return {op: "; ".join(f"{how} on {dev} {dtype}" for (o, dev, dtype), how in sorted(OPS_RAN.items()) if o == op)
            or "not run" for op in FUSED_OPS}


# The DB-focal loss (7), one GCN propagation (4) and QuickGELU: their pure-torch references are the specification;
# these dispatchers run the fused C++/CUDA kernels of csrc/ (torch.ops.capnet.*) for backend "auto" when built with a
# kernel for the tensor's device (and it passed its first-use check), or "ext".

def _reduction_code(reduction):
    codes = {"none": 0, "mean": 1, "sum": 2}  # the kernel's
    if reduction not in codes:
        raise ValueError(f"db_focal_loss: reduction must be one of {list(codes)}, got {reduction!r}")
    return codes[reduction]


def _check_db_focal_args(logits, targets, class_freq, num_images, class_weight, reduction):
    # clear errors for bad input; the kernels check the same things in C++
    _reduction_code(reduction)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"db_focal_loss: logits must be a 2-D (B, C) floating tensor, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if targets.shape != logits.shape:
        raise ValueError(f"db_focal_loss: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"{tuple(logits.shape)}")
    if ((targets != 0) & (targets != 1)).any():
        raise ValueError("db_focal_loss: targets must be 0 or 1")
    C = logits.shape[1]
    for name, t in (("class_freq", class_freq), ("class_weight", class_weight)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"db_focal_loss: {name} must have shape (C,) = ({C},), got {tuple(t.shape)}")
    bad = ((class_freq <= 0) | (class_freq >= num_images)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"db_focal_loss: class {bad[0]} has training count {class_freq[bad[0]].item()}; "
                         f"the DB loss needs 0 < n_c < num_images ({num_images})")


def _check_propagate_args(adj, x, weight):
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"graph_propagate: adj must be square (C, C), got {tuple(adj.shape)}")
    if x.dim() != 2 or x.shape[0] != adj.shape[0]:
        raise ValueError(f"graph_propagate: x must be (C, Din) with C = {adj.shape[0]}, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"graph_propagate: weight must be (Din, Dout) with Din = {x.shape[1]}, "
                         f"got {tuple(weight.shape)}")


def db_focal_pair(targets, class_freq, num_images, class_weight=None, reduction="mean", **kw):
    """(kernel, reference), each logits -> db_focal_loss with the rest bound (kw: alpha ... balance)."""
    code = _reduction_code(reduction)
    if kw.get("gamma_neg") is None:  # one exponent for both signs
        kw["gamma_neg"] = kw.get("gamma", 2.0)
    defaults = dict(alpha=0.1, beta=10.0, mu=0.2, kappa=0.05, lam=2.0, gamma=2.0, gamma_neg=2.0, balance=2.0)
    params = [float(kw.get(k, v)) for k, v in defaults.items()]  # the schema's order

    def kernel(logits):
        grad = torch.is_grad_enabled() and logits.requires_grad
        return torch.ops.capnet.db_focal_loss(logits, targets, class_freq, float(num_images), *params, class_weight,
                                              code, grad)[0]

    def reference(logits):
        return db_focal_loss_reference(logits, targets, class_freq, num_images, class_weight=class_weight,
                                       reduction=reduction, **kw)
    return kernel, reference


def db_focal_loss(logits, targets, class_freq, num_images, *, alpha=0.1, beta=10.0, mu=0.2,
                  kappa=0.05, lam=2.0, gamma=2.0, gamma_neg=None, balance=2.0, class_weight=None,
                  reduction="mean", backend="auto"):
    """db_focal_loss_reference, fused: one pass per row computes the loss and its gradient."""
    class_freq = torch.as_tensor(class_freq, device=logits.device)
    kernel, reference = db_focal_pair(targets, class_freq, num_images, class_weight, reduction, alpha=alpha,
                                      beta=beta, mu=mu, kappa=kappa, lam=lam, gamma=gamma, gamma_neg=gamma_neg,
                                      balance=balance)
    # the kernel differentiates w.r.t. logits only: a trainable class_weight takes the reference
    covered = class_weight is None or not class_weight.requires_grad
    return run_fused("db_focal_loss", backend, kernel, reference, [logits], covered)


def propagate_pair(negative_slope=0.2, activation=True):
    """(kernel, reference), each (adj, x, weight) -> graph_propagate."""
    kernel = lambda adj, x, w: torch.ops.capnet.graph_propagate(adj, x, w, float(negative_slope), bool(activation))[0]
    reference = lambda adj, x, w: graph_propagate_reference(adj, x, w, negative_slope=negative_slope,
                                                            activation=activation)
    return kernel, reference


def graph_propagate(adj, x, weight, *, negative_slope=0.2, activation=True, backend="auto"):
    """graph_propagate_reference, fused: ATen GEMMs with the LeakyReLU in the epilogue."""
    if negative_slope < 0 and backend == "ext":  # its backward reads the activation's sign from its output
        raise RuntimeError(f"graph_propagate: backend='ext' needs negative_slope >= 0, got {negative_slope}")
    kernel, reference = propagate_pair(negative_slope, activation)
    return run_fused("graph_propagate", backend, kernel, reference, [adj, x, weight], covered=negative_slope >= 0)


def quick_gelu_reference(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI's QuickGELU: the GELU approximation CLIP was trained with


def quick_gelu(x, *, backend="auto"):
    """quick_gelu_reference, fused: one pass, float32 math, rounded once to x's dtype (float64: double math)."""
    kernel = lambda t: torch.ops.capnet.quick_gelu(t)
    sample = lambda: [x.detach().flatten()[:1 << 16]]  # elementwise: a slice checks it at a fraction of the cost
    return run_fused("quick_gelu", backend, kernel, quick_gelu_reference, [x], check_on=sample)


# Autograd and the meta (fake) kernels that torch.compile and torch.library.opcheck trace are registered in C++
# (csrc/capnet_ops.cpp). Under autocast the kernels' inner ATen GEMMs would be autocast again and return bf16
# (then the next GCN layer fails its dtype check): the ops take float32 inputs and run outside it.
if EXT_AVAILABLE:
    for _op in ("capnet::db_focal_loss", "capnet::graph_propagate"):
        for _device in ("cpu", "cuda"):
            torch.library.register_autocast(_op, _device, torch.float32)

# -----------------------------------------------------------------------------
# runs: config resolution, checkpoints, the training loop, seeds and tables

# The train loop owns runs/<name>/: config.json, log.txt, checkpoint.pt (atomic), results.json, per_class_ap.csv,
# ap_vs_freq.png. Everything that decides a number is a pure function of (config, seed, epoch, index), so a
# killed run resumed from its checkpoint reaches the same final numbers as one that never stopped.

# how to prepare each known dataset: python data_prep.py <these> (printed when data/<name>/dataset.json is missing)
DATA_PREP_ARGS = {"synthetic-lt": "synthetic-lt", "voc-lt": "voc-lt --voc-root DIR --split img_id.txt",
                  "coco-lt": "coco-lt --coco-root DIR --split img_id.pkl", "nus-wide-lt": "nus-wide-lt --nus-root DIR"}
CHOICES = {
    "loss": LOSSES, "ctx": ("class", "shared"), "recipe": tuple(RECIPES),
    "optimizer": ("sgd", "adam"), "schedule": ("cosine", "onecycle"),
    "peft": ("adaptformer", "none", "full"), "sampler": ("uniform", "class-aware"), "tte": (1, 5, 10),
    "device": ("auto", "cpu", "cuda"), "amp": ("auto", "bf16", "none"), "backend": ("auto", "ext", "torch"),
}
# fields that may change between a run and its --resume without changing any number
RESUME_FREE = {"resume", "workers", "log_every", "device", "eval_batch_size", "compile", "seeds", "recipe"}
CHECKPOINT_FORMAT = "capnet-checkpoint-1"


class RunError(RuntimeError):
    """A user-facing failure whose message says what to do (printed without a traceback)."""


def preset_config(data: str, method: str = "capnet", recipe: str = "") -> Config:
    """Config's defaults, then the recipe's common flags, the data preset, the recipe's flags for this data, the
    method's. The recipe: as given, else the data preset's, else Config's."""
    preset = PRESETS.get(data, {})
    recipe = recipe or preset.get("recipe", Config.recipe)
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    layers = (RECIPES[recipe]["*"], preset, RECIPES[recipe].get(data, {}), METHODS[method], dict(recipe=recipe))
    return Config(**{k: v for layer in layers for k, v in layer.items()}, data=data)


# fields that never name a run: its place, and what may change on --resume (RESUME_FREE) without changing a number
NOT_IN_RUN_NAME = {"name", "out_dir", "data", "data_root", "clip", "ckpt_every"}


def run_name(cfg: Config) -> str:
    """data, the recipe unless the data's own, the backbone unless the preset's, then every field off the preset."""
    base = preset_config(cfg.data, recipe=cfg.recipe)
    parts = [cfg.data] + ([f"recipe-{cfg.recipe}"] if cfg.recipe != preset_config(cfg.data).recipe else [])
    if cfg.clip and cfg.clip != base.clip and Path(cfg.clip).name != "clip.pt":
        parts.append((cfg.clip if cfg.clip in KNOWN_MODELS else Path(cfg.clip).stem).replace("/", "-").replace("@", "-"))
    for key, value in dataclasses.asdict(cfg).items():
        if key in NOT_IN_RUN_NAME | RESUME_FREE or value == getattr(base, key):
            continue
        if key == "graph" and value not in GRAPH_MODES:  # a graph file: its name without folder and suffix
            value = Path(value).stem
        parts.append(f"{flag(key)[2:]}-{value if value != '' else 'none'}".replace(" ", "_"))
    return "-".join(parts)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_config(cfg: Config) -> Config:
    """Check every choice and fill the "" defaults that depend on other fields."""
    cfg = dataclasses.replace(cfg)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{flag(key)} {getattr(cfg, key)!r}: expected one of {', '.join(map(str, allowed))}")
    if cfg.graph not in GRAPH_MODES and Path(cfg.graph).suffix not in (".npy", ".pt", ".txt"):
        raise ValueError(f"--graph {cfg.graph!r}: expected one of {', '.join(GRAPH_MODES)}, or a .npy, .pt or .txt "
                         f"file holding a C x C matrix")
    bounds = {"batch_size": 1, "eval_batch_size": 1, "input_size": 1, "n_ctx": 1, "epochs": 0, "workers": 0,
              "adapter_dim": 0, "ckpt_every": 0, "seed": 0, "log_every": 0, "gcn_hidden": 0, "graph_topk": 0,
              "graph_tau": 0, "gcn_lr": 0, "temperature_lr_scale": 0}
    for key, least in bounds.items():
        if getattr(cfg, key) < least:
            raise ValueError(f"{flag(key)} must be at least {least}, got {getattr(cfg, key)}")
    for key, ok, rule in (("p", 0 <= cfg.p <= 1, "lie in [0, 1]"), ("scale_min", 0 < cfg.scale_min <= 1, "lie in (0, 1]"),
                          ("tau_prime", cfg.tau_prime > 0, "be positive (inf turns re-weighting off)")):
        if not ok:
            raise ValueError(f"{flag(key)} must {rule}, got {getattr(cfg, key)}")
    if cfg.backend == "ext" and not EXT_AVAILABLE:
        raise ValueError("--backend ext: the capnet_ext extension is not built (python setup.py build_ext --inplace)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if cfg.seeds and not all(s.strip().isdigit() for s in cfg.seeds.split(",")):
        raise ValueError(f"--seeds {cfg.seeds!r}: expected comma-separated seeds, e.g. 0,1,2")
    if not cfg.clip:  # the data set's own CLIP (the synthetic world pretrains one)
        cfg.clip = str(Path(cfg.data_root) / cfg.data / "clip.pt")
    if not cfg.name:
        cfg.name = run_name(cfg)
    return cfg


# flags that act only in some runs: (fields, acts(cfg), why not elsewhere). A flag given on the command line where it
# cannot act is refused by name; a preset's value there is merely unused
FLAGS_THAT_MAY_NOT_ACT = (
    (("n_ctx",), lambda c: not c.ctx_init, "the context is --ctx-init's tokens, M their count (--ctx-init '': random)"),
    (("s",), lambda c: c.graph == "text" and not c.graph_tau, "s sharpens our text graph (--graph-tau 0) only; "
     "the pre-paper code's graph is sharpened by T = --graph-tau, p its neighbours' share before the softmax"),
    (("graph_topk", "graph_tau"), lambda c: c.graph == "text", "they shape the text graph (--graph text)"),
    (("p",), lambda c: c.graph in ("text", "cooccur"), "p weighs the text or co-occurrence graph's neighbours"),
    (("alpha", "beta", "mu", "kappa", "lam", "balance", "tau_prime", "gamma_neg"), lambda c: c.loss == "db-focal",
     "they are the DB-focal loss's (7), class-aware weights included; the other losses are plain baselines"),
    (("gamma",), lambda c: c.loss in ("db-focal", "focal"), "BCE has no focal factor; ASL runs at its paper's gammas"),
    (("momentum",), lambda c: c.optimizer == "sgd" and c.schedule == "cosine", "Adam has none; OneCycle cycles it"),
    (("warmup_epochs",), lambda c: c.schedule == "cosine", "OneCycle warms up over its first 20% of the steps"),
    (("gcn_lr", "gcn_hidden"), lambda c: c.graph != "none", "--graph none freezes the GCN at F_hat = F_t"),
    (("clip_lr_scale",), lambda c: c.peft == "full", "only --peft full trains CLIP's own weights"),
    (("sampler_power",), lambda c: c.sampler == "class-aware", "only --sampler class-aware draws by class"),
    (("seed",), lambda c: not c.seeds, "--seeds sets each run's seed"),
)


def check_given_flags_act(cfg: Config, given) -> None:
    """No flag silently ignored: each field given on the command line must act in the config it lands in."""
    for fields, acts, why in FLAGS_THAT_MAY_NOT_ACT:
        named = [flag(key) for key in fields if key in given]
        if named and not acts(cfg):
            raise ValueError(f"{' '.join(named)} cannot act in this run: {why}")


def to_jsonable(x):
    # JSON has no inf/nan: inf (e.g. --tau-prime inf) is written as the string "inf", nan as null
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def check_same_config(saved: dict, cfg: Config, what: str):
    """A run is resumed (--resume) or read back (--seeds) only with the config it was made with, up to
    RESUME_FREE (a field added to Config since then held its default)."""
    saved, default = to_jsonable(saved), to_jsonable(dataclasses.asdict(Config()))
    changed = [f"{k} ({saved.get(k, default[k])!r} -> {v!r})" for k, v in to_jsonable(dataclasses.asdict(cfg)).items()
               if k not in RESUME_FREE and saved.get(k, default[k]) != v]
    if changed:
        raise RunError(f"{what} differs in {', '.join(changed)}; start a new run with --name instead")


def write_atomic(path: Path, text_or_payload):
    """Temporary file, fsync, rename (a crash leaves the previous file intact); a str as text, else torch.save."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w" if isinstance(text_or_payload, str) else "wb") as f:
        if isinstance(text_or_payload, str):
            f.write(text_or_payload)
        else:
            torch.save(text_or_payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def versions() -> dict:
    import platform
    import PIL
    # plain str: torch.__version__ is a TorchVersion, which weights_only loading refuses
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "pillow": PIL.__version__, "cuda": torch.version.cuda, "capnet_ext": bool(EXT_AVAILABLE),
            "platform": platform.platform()}


def format_config(cfg: Config) -> str:
    items = [f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()]
    return "\n".join("  " + "  ".join(items[i:i + 6]) for i in range(0, len(items), 6))  # six fields a line


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))  # h:mm:ss


def format_map(m: dict) -> str:
    f = lambda v: "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"
    return " | ".join(f"{g} {f(m[g])}" for g in GROUPS)


def pick_device(cfg: Config) -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun) unless --device cpu or there is none; else the CPU."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")


def setup_device_and_dist(cfg: Config):
    """-> (device, rank, world). Under torchrun: gloo on CPU, nccl on GPU, one GPU per process."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def load_dataset(cfg: Config, rank: int = 0, world: int = 1, prepare: bool = True) -> "Prepared":
    path = Path(cfg.data_root) / cfg.data / "dataset.json"
    if not path.exists() and cfg.data == "synthetic-lt" and prepare:
        # the embedded default is made on first use. data_prep.py runs as its own process, not an import:
        # it imports this file, and an import back would make a circle (and a second copy under __main__)
        if rank == 0:
            command = [sys.executable, str(Path(__file__).resolve().parent / "data_prep.py"),
                       "synthetic-lt", "--root", cfg.data_root]
            print(f"{path} not found: preparing synthetic-lt ({' '.join(command[1:])})", flush=True)
            if subprocess.run(command).returncode != 0:
                raise RunError("preparing synthetic-lt failed (its error is printed above)")
        barrier(world)
    if not path.exists():  # a name without a command here is a custom dataset, made by `data_prep.py lists`
        how = DATA_PREP_ARGS.get(cfg.data, f"lists --train F --test F --classes F --image-root DIR --name {cfg.data}")
        raise RunError(f"dataset {cfg.data!r} is not prepared: {path} does not exist.\nPrepare it with:\n"
                       f"  python data_prep.py {how}\n(see README.md, 'Reproducing the benchmarks').")
    prepared = load_prepared(path)
    scale = prepared.source.get("clip", {}).get("logit_scale")  # below 100 (or absent): drawn before v4
    if cfg.data == "synthetic-lt" and rank == 0 and not (isinstance(scale, (int, float)) and scale >= 99.5):
        print(f"warning: {path} was drawn by an older data_prep.py: its small CLIP ends at logit scale "
              f"{scale or 'about 14'}, where the synthetic preset was chosen for 100 (docs/synthetic-lt.md); "
              f"remove {path.parent} to redraw it", file=sys.stderr, flush=True)
    return prepared


def make_test_set(prepared, cfg: Config):
    return MultiLabelDataset(prepared.test, prepared.image_root, len(prepared.classes), cfg.input_size,
                             mode="eval", n_views=cfg.tte, seed=cfg.seed, skip_bad=cfg.skip_bad_images)


def make_loader(dataset, cfg: Config, **kwargs):
    # no worker_init_fn: nothing draws from numpy's or Python's global RNG in a worker (every crop
    # comes from its own generator keyed by seed, epoch and index), so their copies do not matter
    return torch.utils.data.DataLoader(dataset, num_workers=cfg.workers,
                                       collate_fn=collate_skip_bad if cfg.skip_bad_images else None, **kwargs)


def load_backbone(cfg: Config):
    """The frozen CLIP named by cfg.clip (load_clip names a missing file); never a toy model for a real dataset."""
    try:
        return install_fast_paths(load_clip(cfg.clip), cfg.backend)
    except RuntimeError as e:  # offline without the file, truncated or foreign file: the message says which
        raise RunError(str(e)) from None


def build_model(clip, classes, cfg: Config, train_targets, device="cpu", P=None) -> CAPNet:
    """The label graph (3) unless given (a checkpoint's), then CAPNet as cfg says, initialised from cfg.seed (its own
    generator): a rebuilt model starts where training did."""
    if P is None:
        P = build_label_graph(cfg.graph, clip, classes, train_targets, s=cfg.s, p=cfg.p, topk=cfg.graph_topk,
                              tau=cfg.graph_tau)
    model = CAPNet(clip, classes, P, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, shared_ctx=cfg.ctx == "shared",
                   train_gcn=cfg.graph != "none", gcn_hidden=cfg.gcn_hidden,
                   peft=cfg.peft, adapter_dim=cfg.adapter_dim, train_temperature=cfg.temperature_lr_scale > 0,
                   backend=cfg.backend, seed=cfg.seed).to(device)
    if use_bf16(cfg, torch.device(device)):  # after the label graph, which is computed in fp32
        hold_frozen_in_bf16(model.clip)
    return model


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """The lr schedule over epochs * steps_per_epoch steps, stepped once per training step."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":  # as the pre-paper code: 20% of the steps from each group's lr / 25 up to its lr,
        # then cosine down to lr / 25e4; the momentum (SGD) or Adam's beta1 cycles 0.95 -> 0.85 -> 0.95 meanwhile.
        # Deviation: that code fixes 120 epochs x 60 steps whatever the run's length; we fit the cycle to the run
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in optimizer.param_groups],
                                                   total_steps=max(1, total), pct_start=0.2)
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch))) if cfg.warmup_epochs > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Our schedule: linear warm-up to the peak lr, then cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_classes(ckpt: dict, classes: list, where: str):
    """The checkpoint's class list against a data set's (the data set's name is a config field: check_same_config)."""
    old, new = list(ckpt["classes"]), list(classes)
    if old != new:
        diff = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(old, new)) if a != b][:3]
        raise RunError(f"{where}: class list differs from the checkpoint's ({len(old)} classes in the "
                       f"checkpoint, {len(new)} now; {'; '.join(diff) or 'one list extends the other'})")


def check_backbone(ckpt: dict, clip_source: dict, where: str):
    """The CLIP the checkpoint was trained with against the one loaded now, by SHA-256."""
    was, now = ckpt["clip"], clip_source
    if was.get("sha256") != now.get("sha256"):
        raise RunError(f"{where}: backbone differs: checkpoint was trained with CLIP {was.get('name')!r} (sha256 "
                       f"{str(was.get('sha256'))[:12]}), now {now.get('name')!r} (sha256 {str(now.get('sha256'))[:12]})")


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, unpickling refused ...
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
        reason = next((l for l in lines if "error:" in l.lower()), lines[0])  # torch's unpickler: the real cause
        raise RunError(f"checkpoint {path} is truncated or corrupted and cannot be read "
                       f"({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a CAPNet checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    return ckpt


def load_trainable(model: nn.Module, state: dict):
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RunError(f"checkpoint parameters do not fit this model (missing: {missing[:5]}, "
                       f"unexpected: {unexpected[:5]}); was it trained with other --peft/--n-ctx/--adapter-dim?")
    with torch.no_grad():  # same config and classes (checked), so the same shapes
        for n in expected:
            params[n].copy_(state[n])


def save_checkpoint(run: Run, model: CAPNet, optimizer, scheduler, step: int, ap_zero_shot):
    """runs/<name>/checkpoint.pt, atomically, by rank 0: all that restore_checkpoint and load_for_inference read."""
    if run.rank == 0:
        # torch's RNG seeds the DataLoader workers; numpy's global RNG is never drawn from (make_loader)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        write_atomic(run.dir / "checkpoint.pt", {
            "format": CHECKPOINT_FORMAT, "optimizer": optimizer.state_dict(),
            "model": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
            "holds": "the full model (--peft full)" if run.cfg.peft == "full" else "the trainable parameters",
            "scheduler": scheduler.state_dict(), "step": step, "rng": rng, "graph": model.gcn.P.cpu(),  # (C, C) P
            "config": dataclasses.asdict(run.cfg), "classes": list(run.prepared.classes), "clip": dict(run.clip.source),
            "class_counts": torch.as_tensor(run.counts, dtype=torch.int64),
            "train_targets": torch.as_tensor(run.train_targets).bool(), "zero_shot_ap": ap_zero_shot,
            "wall_seconds": time.time() - run.start, "versions": versions()})
    barrier(run.world)


def restore_checkpoint(run: Run, ckpt: dict, model: CAPNet, optimizer, scheduler) -> int:
    """--resume: the trainable parameters, optimizer, scheduler and RNG states of the checkpoint -> its step."""
    load_trainable(model, ckpt["model"])
    if len(ckpt["optimizer"]["param_groups"]) != len(optimizer.param_groups):  # a checkpoint of older code
        raise RunError(f"--resume {run.dir}: the checkpoint's optimizer has other parameter groups than this "
                       f"capnet.py builds; evaluate it with `capnet.py eval`, or train a new run")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    run.start -= ckpt["wall_seconds"]  # wall_seconds counts every session
    return ckpt["step"]


def load_resume_checkpoint(run: Run) -> dict:
    """--resume: the run's checkpoint, made with this config, class list and backbone."""
    ckpt = load_checkpoint(run.dir / "checkpoint.pt")
    check_same_config(ckpt["config"], run.cfg, f"--resume {run.dir}: the checkpoint's config")
    check_classes(ckpt, run.prepared.classes, f"--resume {run.dir}")
    check_backbone(ckpt, run.clip.source, f"--resume {run.dir}")
    return ckpt


PROGRESS_SECONDS = 10.0


def with_progress(batches, what: str, total: int, batch_size: int):
    """Yields the batches; every PROGRESS_SECONDS 'what: done/total images | images/s | eta' on stderr."""
    t0 = last = time.time()
    for k, batch in enumerate(batches, 1):
        yield batch
        done, now = min(total, k * batch_size), time.time()
        if now - last >= PROGRESS_SECONDS and done < total:
            rate, last = done / (now - t0), now
            print(f"{what}: {done}/{total} images | {rate:.1f} images/s | eta "
                  f"{format_duration((total - done) / rate)}", file=sys.stderr, flush=True)


@torch.no_grad()
def score_dataset(forward, dataset, cfg: Config, device, amp: bool, rank: int = 0, world: int = 1):
    """-> (scores (N, C), targets (N, C)) over the whole set; under DDP each process scores
    every world-th image and the pieces are gathered (in dataset order) on every process."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = make_loader(shard, cfg, batch_size=max(1, cfg.eval_batch_size // max(1, cfg.tte)))
    if dataset.skip_bad:  # bad_count: this pass's unreadable images (zero-shot and final pass read the same)
        dataset._bad.value = 0
    C = dataset.targets.shape[1]
    scores, targets, indices = [torch.zeros(0, C)], [torch.zeros(0, C)], [torch.zeros(0, dtype=torch.long)]
    for batch in with_progress(loader, "scoring", len(shard), loader.batch_size) if rank == 0 else loader:
        if batch is None:  # every image of the batch unreadable (--skip-bad-images)
            continue
        images, target, index = batch
        with autocast(device, amp):
            scores.append(view_logits(forward, images.to(device)).cpu())  # (B, C)
        targets.append(target.float())
        indices.append(torch.as_tensor(index).view(-1))
    part = (torch.cat(scores), torch.cat(targets), torch.cat(indices))
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, part)
        part = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
    order = torch.argsort(part[2])
    return part[0][order], part[1][order]


def zero_shot_forward(clip, classes):
    """Plain CLIP with "a photo of a {name}." (no prompts, no GCN, no PEFT): the baseline, through CAPNet's head."""
    text = zero_shot_text_features(clip, classes)  # (C, D)
    return lambda images: cosine_logits(clip.encode_image(images), text, clip.logit_scale.detach())  # (B, C)


def trainable_summary(model: CAPNet) -> str:
    """Trainable parameter counts by part, then the frozen rest: one line each."""
    counts = {k: sum(p.numel() for p in v) for k, v in model.trainable_parts().items()}
    counts["trainable"] = trainable = sum(counts.values())
    counts["frozen (CLIP)"] = sum(p.numel() for p in model.parameters()) - trainable
    label = lambda k: f"peft ({model.peft})" if k == "peft" else k
    return "\n".join(f"{label(k):<20} {v:>12,}" for k, v in counts.items())


def plot_ap_vs_freq(per_class: list, path: Path, title: str):
    """Per-class AP (y, %) against training images (x, log scale) on the tail / medium / head
    bands: zero-shot (grey ring) joined to trained (orange dot)."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, left, right, top, bottom = 960, 600, 90, 30, 60, 80
    img = Image.new("RGB", (W, H), "white")
    d, font, small = ImageDraw.Draw(img), ImageFont.load_default(size=18), ImageFont.load_default(size=14)
    counts = [max(1, c["train_count"]) for c in per_class]
    lo, hi = math.floor(math.log10(min(counts))), math.ceil(math.log10(max(counts) + 1))  # decades
    x_of = lambda n: left + (math.log10(max(1, n)) - lo) / (hi - lo) * (W - left - right)
    y_of = lambda ap: H - bottom - ap / 100.0 * (H - top - bottom)
    for a, b, colour, label in ((1, TAIL_MIN, (255, 236, 236), "tail"), (TAIL_MIN, HEAD_MIN, (255, 248, 225), "medium"),
                                (HEAD_MIN, 10 ** hi, (232, 244, 255), "head")):
        a, b = max(a, 10 ** lo), min(b, 10 ** hi)
        if a < b:
            d.rectangle([x_of(a), top, x_of(b), H - bottom], fill=colour)
            d.text(((x_of(a) + x_of(b)) / 2, top + 6), label, fill=(90, 90, 90), font=small, anchor="mt")
    for ap in range(0, 101, 20):
        d.line([left, y_of(ap), W - right, y_of(ap)], fill=(215, 215, 215))
        d.text((left - 8, y_of(ap)), str(ap), fill="black", font=small, anchor="rm")
    for e in range(lo, hi + 1):
        d.text((x_of(10 ** e), H - bottom + 10), f"{10 ** e:g}", fill="black", font=small, anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for xy, text in (((W / 2, 25), title), ((45, top - 20), "AP (%)"), ((W / 2, H - 30),
                     "training images per class (log scale); grey ring: zero-shot CLIP, orange dot: CAPNet (trained)")):
        d.text(xy, text, fill="black", font=font if xy[1] != H - 30 else small, anchor="mm")
    for c in per_class:
        if c["ap"] is not None and c["ap_zero_shot"] is not None:
            x, y0, y1 = x_of(c["train_count"]), y_of(c["ap_zero_shot"]), y_of(c["ap"])
            d.line([x - 4, y0, x + 4, y1], fill=(180, 180, 180))
            d.ellipse([x - 9, y0 - 5, x + 1, y0 + 5], outline=(120, 120, 120), width=2)
            d.ellipse([x - 1, y1 - 5, x + 9, y1 + 5], fill=(220, 90, 20))
    img.save(path)


def per_class_rows(classes, counts, ap_zero_shot, ap) -> list:
    percent = lambda v: None if math.isnan(float(v)) else 100.0 * float(v)  # like mAP; NaN (no positive) -> None
    return [{"name": name, "train_count": int(counts[i]), "group": class_group(int(counts[i])),
             "ap_zero_shot": percent(ap_zero_shot[i]), "ap": percent(ap[i])}
            for i, name in enumerate(classes)]


def write_outputs(run_dir: Path, results: dict):
    write_json(run_dir / "results.json", results)
    fmt = lambda v: "" if v is None else f"{v:.4f}"
    lines = ["name,train_count,group,ap_zero_shot,ap"] + [
        f"{json.dumps(c['name'])},{c['train_count']},{c['group']},{fmt(c['ap_zero_shot'])},{fmt(c['ap'])}"
        for c in results["per_class"]]
    write_atomic(run_dir / "per_class_ap.csv", "\n".join(lines) + "\n")
    zs, tr = results["zero_shot"], results["trained"]
    plot_ap_vs_freq(results["per_class"], run_dir / "ap_vs_freq.png",
                    f"{results['config']['data']}: mAP zero-shot {zs['total']:.1f} -> trained {tr['total']:.1f}")


class Run:
    """One training run as its parts read it: config, folder, processes, data set, backbone; its log and scoring."""

    def __init__(self, cfg: Config):
        self.start = time.time()  # earlier by the sessions before a --resume (restore_checkpoint)
        self.cfg, self.dir = cfg, Path(cfg.out_dir) / cfg.name
        self.device, self.rank, self.world = setup_device_and_dist(cfg)
        if cfg.batch_size % self.world:
            raise RunError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by {self.world} "
                           f"processes")
        if not cfg.resume and ((self.dir / "checkpoint.pt").exists() or (self.dir / "results.json").exists()):
            raise RunError(f"{self.dir} already holds a run: pass --resume to continue it, "
                           f"or --name NAME to start a new one")
        self.prepared = load_dataset(cfg, self.rank, self.world)
        self.counts = class_counts(self.prepared.train, len(self.prepared.classes))  # (C,) n_c, from train only
        self.train_targets = multihot(self.prepared.train, len(self.prepared.classes))  # (N, C)
        self.clip = load_backbone(cfg).to(self.device)
        self.amp = use_bf16(cfg, self.device)

    def log(self, msg: str = ""):
        """Print, and append to log.txt; other ranks stay quiet."""
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.dir / "log.txt", "a") as f:
                f.write(msg + "\n")

    def score(self, forward, dataset):
        """Per-class AP (C,) of forward on the whole dataset, shared across DDP processes."""
        return average_precision(*score_dataset(forward, dataset, self.cfg, self.device, self.amp, self.rank,
                                                self.world))


def train_run(cfg: Config) -> dict:
    """Train CAPNet per cfg (or once per seed with --seeds) -> results dict (also runs/<name>/results.json)."""
    cfg = resolve_config(cfg)
    return train_seeds(cfg) if cfg.seeds else train_one(cfg)


def train_one(cfg: Config) -> dict:
    """One run of a resolved cfg in runs/<name>/: zero-shot at step 0, the model, its epochs from the start or from
    the checkpoint (--resume), the final evaluation."""
    run = Run(cfg)
    prepared, device, clip = run.prepared, run.device, run.clip
    ckpt = load_resume_checkpoint(run) if cfg.resume else None
    if run.rank == 0:
        run.dir.mkdir(parents=True, exist_ok=True)
        write_json(run.dir / "config.json", dataclasses.asdict(cfg))
    run.log(f"CAPNet train: {run.dir} ({'resuming at step %d' % ckpt['step'] if ckpt else 'new run'}), "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    run.log("config:\n" + format_config(cfg) + f"\ndataset {prepared.name}: {len(prepared.train)} train / "
            f"{len(prepared.test)} test images\n" + format_class_stats(prepared.classes, run.counts))
    ddp = f", DDP {'nccl' if device.type == 'cuda' else 'gloo'}" if run.world > 1 else ""
    run.log(f"fused ops: --backend {cfg.backend}, extension {'built' if EXT_AVAILABLE else _EXT_WHY_NOT}"
            f"{' with CUDA kernels' if EXT_CUDA else ''} (each kernel is checked against its reference on first use)\n"
            f"device {device}, {'bf16 autocast' if run.amp else 'fp32'}, {run.world} process(es){ddp}\n"
            f"CLIP {clip.source['name']} (sha256 {clip.source['sha256'][:12]}), embed dim {clip.embed_dim}, "
            f"input {cfg.input_size}")
    test_set = make_test_set(prepared, cfg)
    if ckpt is not None:
        ap_zero_shot = ckpt["zero_shot_ap"]
    else:  # step 0: plain CLIP, same TTE, before any training
        t0 = time.time()
        ap_zero_shot = run.score(zero_shot_forward(clip, prepared.classes), test_set)
        run.log(f"zero-shot mAP (step 0, tte {cfg.tte}): " + format_map(lt_map(ap_zero_shot, run.counts))
                + f"  [{time.time() - t0:.1f}s]")
    model = build_model(clip, prepared.classes, cfg, run.train_targets, device, P=ckpt.get("graph") if ckpt else None)
    run.log("trainable parameters:\n" + trainable_summary(model))
    train_set = MultiLabelDataset(prepared.train, prepared.image_root, len(prepared.classes), cfg.input_size,
                                  mode="train", scale_min=cfg.scale_min, seed=cfg.seed, skip_bad=cfg.skip_bad_images)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    step = restore_checkpoint(run, ckpt, model, optimizer, scheduler) if ckpt else 0
    save = lambda step: save_checkpoint(run, model, optimizer, scheduler, step, ap_zero_shot)
    train_epochs(run, model, optimizer, scheduler, train_set, step, save)
    return final_evaluation(run, model, test_set, train_set, ap_zero_shot)


def train_epochs(run: Run, model: CAPNet, optimizer, scheduler, train_set, step: int, save):
    """The epochs from `step` (0, or a checkpoint's) to the end, under DDP and torch.compile as cfg says: batches
    from (seed, epoch), save(step) at least once per epoch; a non-finite loss stops the run, its last checkpoint kept."""
    cfg, device = run.cfg, run.device
    steps_per_epoch = len(train_set) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    class_aware = cfg.sampler == "class-aware"
    weights = sampler_weights(run.train_targets, run.counts, cfg.sampler_power) if class_aware else None
    criterion = make_criterion(cfg, run.counts, len(run.train_targets))
    forward = model
    if run.world > 1:
        # --peft full: CLIP's token table and its own logit scale are trainable but get no gradient
        device_ids = [device.index] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(model, device_ids, find_unused_parameters=cfg.peft == "full")
    if cfg.compile:  # a compiled graph runs its kernels unchecked (run_fused): the GCN's checked once, eagerly, first
        with torch.no_grad(), autocast(device, run.amp):
            model.gcn(model.prompt_learner())
        forward = torch.compile(forward)
    run.log(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay}, {cfg.schedule} schedule ({cfg.recipe} recipe)")
    model.train()
    t_window, s_window = time.time(), step
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        train_set.epoch = epoch
        batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, run.rank, run.world, weights)
        loader = make_loader(train_set, cfg, batch_sampler=batches[step % steps_per_epoch:],
                             pin_memory=device.type == "cuda")
        for batch in loader:
            if batch is None:  # --skip-bad-images dropped every image of this batch: stop clearly
                raise RunError(f"step {step}: no readable image in this training batch "
                               f"(--skip-bad-images); check the data set's images")
            images, targets, _ = batch
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss_value = train_step(model, criterion, optimizer, scheduler, images, targets, run.amp, forward)
            if not torch.isfinite(loss_value):
                ckpt_path = run.dir / "checkpoint.pt"
                kept = (f"the last good checkpoint {ckpt_path} (step {load_checkpoint(ckpt_path)['step']}) is kept"
                        if ckpt_path.exists() else "no checkpoint was written yet")
                raise RunError(f"non-finite loss ({loss_value.item()}) at step {step + 1}; stopping, {kept}. "
                               f"Try a lower --lr.")
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == total_steps):
                rate = (step - s_window) / max(1e-9, time.time() - t_window)
                run.log(f"step {step}/{total_steps} | epoch {epoch + 1}/{cfg.epochs} | loss {loss_value.item():.4f} | "
                        f"lr {scheduler.get_last_lr()[0]:.2e} | {rate:.2f} steps/s | "
                        f"eta {format_duration((total_steps - step) / max(rate, 1e-9))}")
                t_window, s_window = time.time(), step
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step % steps_per_epoch:
                save(step)
        save(step)  # at least once per epoch


def final_evaluation(run: Run, model: CAPNet, test_set, train_set, ap_zero_shot) -> dict:
    """The trained model on the test set beside zero-shot -> results, written to runs/<name>/ with table and plot."""
    cfg, prepared, counts = run.cfg, run.prepared, run.counts
    total_steps = cfg.epochs * (len(train_set) // cfg.batch_size)
    model.eval()
    t0 = time.time()
    ap = run.score(model, test_set) if total_steps else ap_zero_shot  # --epochs 0 (--method zero-shot): step 0
    results = {"zero_shot": lt_map(ap_zero_shot, counts), "trained": lt_map(ap, counts),
               "per_class": per_class_rows(prepared.classes, counts, ap_zero_shot, ap), "config": dataclasses.asdict(cfg),
               "seed": cfg.seed, "versions": versions(), "steps": total_steps, "world_size": run.world,
               "fused_ops": ops_report(), "dataset": {"name": prepared.name, "train_images": len(prepared.train),
                                                   "test_images": len(prepared.test), "source": prepared.source},
               "clip": dict(run.clip.source), "wall_seconds": time.time() - run.start}
    run.log(f"trained mAP (tte {cfg.tte}):  " + format_map(results["trained"]) + f"  [{time.time() - t0:.1f}s]")
    run.log(f"zero-shot mAP (tte {cfg.tte}): " + format_map(results["zero_shot"]))
    run.log("fused ops ran as: " + "; ".join(f"{op}: {how}" for op, how in results["fused_ops"].items()))
    if cfg.skip_bad_images:  # counted per read: a bad train image counts once per epoch in this process
        results["bad_images"] = {"train_reads": train_set.bad_count, "test": test_set.bad_count}
        run.log(f"skipped unreadable images: {train_set.bad_count} train reads, {test_set.bad_count} test images")
    if run.rank == 0:
        write_outputs(run.dir, results)
        run.log(f"wrote {run.dir}/: config.json log.txt checkpoint.pt results.json per_class_ap.csv ap_vs_freq.png "
                f"({format_duration(results['wall_seconds'])})")
    barrier(run.world)
    return results


def train_seeds(cfg: Config) -> dict:
    """--seeds 0,1,2: one run per seed under runs/<name>/seed<k>/, then mean and std (n - 1). A finished seed is
    read back (its config must match), a killed one resumes: a long table costs only what is missing."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    runs = []
    for s in seeds:
        one = dataclasses.replace(cfg, seed=s, seeds="", name=f"{cfg.name}/seed{s}")
        run_dir = Path(cfg.out_dir) / one.name
        if (run_dir / "results.json").exists():
            done = json.loads((run_dir / "results.json").read_text())
            check_same_config(done["config"], one, f"{run_dir} holds a finished run whose config")
            print(f"{run_dir}: finished before, read from results.json", flush=True)
            runs.append(done)
        else:
            runs.append(train_one(dataclasses.replace(one, resume=(run_dir / "checkpoint.pt").exists())))
    summary = {"seeds": seeds, "runs": [f"{cfg.out_dir}/{cfg.name}/seed{s}" for s in seeds], **mean_std(runs)}
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(cfg.out_dir) / cfg.name / "seeds.json", summary)
        print(f"\n{len(seeds)} seeds ({cfg.seeds}): mean +- std mAP")
        for kind in ("zero_shot", "trained"):
            print(f"  {kind:9s} " + " | ".join(f"{g} {summary[kind][g]['mean']:.2f} +- {summary[kind][g]['std']:.2f}"
                                             for g in GROUPS))
    return summary


def mean_std(runs: list, kinds=("zero_shot", "trained")) -> dict:
    """{kind: {group: {"mean", "std" (n - 1), "values"}}} over the runs (a NaN group, None in JSON, stays NaN)."""
    stats = lambda v: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}
    return {kind: {g: stats(np.array([r[kind][g] for r in runs], dtype=np.float64)) for g in GROUPS} for kind in kinds}


TABLES = {  # name: rows, each the train flags it adds to the command line's
    "ablations": ["", "--graph identity", "--graph cooccur", "--loss bce", "--loss focal", "--tau-prime inf",
                  "--peft none", "--tte 1", "--tte 10"],
    "methods": ["--method zero-shot", "--method coop", "--method lmpt", "--method capnet"],
}


def run_table(table: str, train_flags: list) -> str:
    """`python capnet.py table NAME [train flags]` -> the markdown table (also runs/table-NAME-<data>.md)."""
    lines = ["| row | " + " | ".join(GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]
    cell = lambda m: f"{m['mean']:.2f} +- {m['std']:.2f}"
    first = None
    for i, flags in enumerate(TABLES[table]):
        cfg = config_from_args(build_parser().parse_args(["train", *train_flags, *flags.split()]))
        cfg = resolve_config(dataclasses.replace(cfg, name="", seeds=cfg.seeds or "0,1,2"))
        if "--name" in train_flags:  # --name X groups the rows: runs/X/<row's derived name>/seed<k>
            cfg.name = f"{train_flags[train_flags.index('--name') + 1]}/{cfg.name}"
        first = first or cfg
        if i and dataclasses.replace(cfg, tte=first.tte, name=first.name) == first:
            # only the TTE differs, which training never reads: score the first row's checkpoints again
            summary = mean_std([{"trained": evaluate(Path(cfg.out_dir) / first.name / f"seed{s}" / "checkpoint.pt",
                                                     cfg.tte, cfg.device, workers=cfg.workers)}
                                for s in cfg.seeds.split(",")], kinds=("trained",))
        else:
            summary = train_seeds(cfg)
        if i == 0 and "zero-shot" not in flags:  # plain CLIP with the first row's TTE, the same in every run
            lines.append("| zero-shot | " + " | ".join(cell(summary["zero_shot"][g]) for g in GROUPS) + " |")
        lines.append(f"| {flags or 'full model'} | " + " | ".join(cell(summary["trained"][g]) for g in GROUPS) + " |")
    text = "\n".join(lines) + f"\n\n(mAP %, mean +- std over seeds {cfg.seeds}; {cfg.data})\n"
    path = Path(cfg.out_dir) / f"table-{table}-{cfg.data}.md"
    write_atomic(path, text)
    print(f"\n{text}wrote {path}")
    return text

# -----------------------------------------------------------------------------
# eval and predict

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_for_inference(ckpt_path, device: str = "auto", **overrides):
    """-> (model in eval mode, cfg, ckpt, device): CAPNet exactly as trained, rebuilt from the checkpoint's
    config (but for the overrides not None: tte, workers ...), classes, counts and labels and trained parameters."""
    ckpt = load_checkpoint(ckpt_path)
    unknown = sorted(set(ckpt["config"]) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise RunError(f"checkpoint of another capnet.py version: its config has fields {', '.join(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = resolve_config(Config(**{**ckpt["config"], "device": device, "resume": False, **given}))
    dev = pick_device(cfg)
    clip = load_backbone(cfg).to(dev)
    check_backbone(ckpt, clip.source, f"checkpoint {ckpt_path}")
    model = build_model(clip, list(ckpt["classes"]), cfg, ckpt["train_targets"].float().numpy(), dev,
                        P=ckpt.get("graph"))  # the P it trained with; older checkpoints rebuild it
    load_trainable(model, ckpt["model"])
    return model.eval(), cfg, ckpt, dev


def evaluate(ckpt_path=None, tte: int | None = None, device: str = "auto", out_dir: str = "runs",
             workers: int | None = None, skip_bad: bool = False) -> dict:
    """`capnet.py eval`: model, preprocessing and class list from the checkpoint -> mAP dict (percent)."""
    if not ckpt_path:  # the latest run's
        found = sorted(Path(out_dir).glob("**/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise RunError(f"no checkpoint under {out_dir}/: train first (python capnet.py train) or pass --ckpt")
        ckpt_path = found[-1]
    # --skip-bad-images turns skipping on; without it the run's setting holds
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte=tte, workers=workers,
                                               skip_bad_images=skip_bad or None)
    prepared = load_dataset(cfg, prepare=False)
    check_classes(ckpt, prepared.classes, f"checkpoint {ckpt_path} vs {cfg.data_root}/{cfg.data}")
    counts = ckpt["class_counts"].numpy()
    if not np.array_equal(counts, class_counts(prepared.train, len(prepared.classes))):
        raise RunError(f"checkpoint {ckpt_path}: the training set of {cfg.data_root}/{cfg.data} changed since "
                       f"training (class counts differ), so head/medium/tail would not match")
    test_set = make_test_set(prepared, cfg)
    t0 = time.time()
    result = lt_map(average_precision(*score_dataset(model, test_set, cfg, dev, use_bf16(cfg, dev))), counts)
    print(f"{ckpt_path} (step {ckpt['step']}), {cfg.data} test ({len(test_set)} images, {test_set.bad_count} unreadable "
          f"skipped), tte {cfg.tte}: {time.time() - t0:.1f}s")
    print("mAP " + format_map(result))
    return {**result, "bad_images": {"test": test_set.bad_count}}


@torch.no_grad()
def predict(ckpt_path, paths, threshold: float = 0.5, top_k: int = 5, tte: int | None = None,
            device: str = "auto", as_json: bool = False, batch_size: int = 16) -> list:
    """`capnet.py predict`: per image (batch by batch) the labels with probability >= threshold, or its error."""
    if not 0.0 <= threshold <= 1.0 or top_k < 1 or batch_size < 1:
        raise RunError(f"out of range: --threshold {threshold} (0..1), --top-k {top_k} or --batch-size {batch_size} (>= 1)")
    files = []
    is_image = lambda f: f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    for p in map(Path, paths):  # a folder's images, or a file (a missing one is reported among the results)
        files += sorted(filter(is_image, p.rglob("*"))) if p.is_dir() else [p]
    if not files:
        raise RunError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte=tte)
    classes, amp = list(ckpt["classes"]), use_bf16(cfg, dev)
    width = min(60, max(len(str(f)) for f in files) + 2)
    print("[" if as_json else f"{'image'.ljust(width)}labels with probability >= {threshold:.2f} (top {top_k})")

    def row(f, p):  # p: (C,) probabilities
        label = lambda i: {"name": classes[i], "prob": round(float(p[i]), 4)}
        best = torch.argsort(p, descending=True).tolist()
        labels = [label(i) for i in best[:top_k] if p[i] >= threshold]
        return {"image": str(f), "labels": labels, "best": label(best[0])}

    def show(r):  # one element of the JSON list (opened by "[" above), or one table line
        if as_json:
            return print((" " if r is rows[0] else ",") + json.dumps(r), flush=True)
        labels = ", ".join(f"{l['name']} {l['prob']:.2f}" for l in r.get("labels", []))
        best = "best" in r and f"(none; best: {r['best']['name']} {r['best']['prob']:.2f})"
        print(r["image"].ljust(width) + (labels or best or f"error: {r['error']}"), flush=True)

    rows = []
    for chunk in with_progress((files[i:i + batch_size] for i in range(0, len(files), batch_size)),
                               "predict", len(files), batch_size):
        read = []
        for f in chunk:  # (V, 3, S, S) views, or the OSError naming the file: the other images go on
            try:
                read.append(tte_views(load_rgb(f, exif=True), cfg.input_size, cfg.tte))
            except OSError as e:
                read.append(e)
        good = [v for v in read if torch.is_tensor(v)]
        with autocast(dev, amp):
            probs = iter(torch.sigmoid(view_logits(model, torch.stack(good).to(dev))).cpu() if good else [])  # (B, C)
        for f, v in zip(chunk, read):
            rows.append(row(f, next(probs)) if torch.is_tensor(v) else {"image": str(f), "error": str(v)})
            show(rows[-1])
    if as_json:
        print("]")
    failed = [r["error"] for r in rows if "error" in r]
    print(f"{len(rows)} images, {len(failed)} unreadable", *failed, sep="\n  ", file=sys.stderr)
    return rows


def info():
    """`capnet.py info`: versions, device, extension status, known CLIP models and which are present."""
    print(", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
          *[f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())], sep=", ")
    print("fused ops: " + ("capnet_ext extension built (backend auto -> ext)" if EXT_AVAILABLE else
                           "extension not built, pure torch reference used (python setup.py build_ext --inplace)"))
    cache = clip_cache_dir()
    print(f"CLIP models (download cache {cache}):")
    for name, url in KNOWN_MODELS.items():
        path = cache / os.path.basename(url)
        print(f"  {name:16s} {'present' if path.exists() else 'absent '}  {path}")


# -----------------------------------------------------------------------------
# CLI

def config_from_args(args) -> Config:
    """The presets of --data (the command line's default: the embedded world), --recipe and --method, then every
    flag given on the command line (argparse's None: not given), each of which must act."""
    cfg = preset_config(args.data or "synthetic-lt", args.method or "capnet", args.recipe or "")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **given)
    check_given_flags_act(cfg, given)
    return cfg


def build_parser():
    parser = argparse.ArgumentParser(prog="capnet.py", allow_abbrev=False,
                                     description="CAPNet: CLIP prompts + label-graph GCN for long-tailed multi-label recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", allow_abbrev=False, help="train (default: the embedded synthetic-lt)")
    p.add_argument("--method", choices=sorted(METHODS), help="a preset of flags (README: Methods and baselines)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (as config.json) and exit")
    # one strict --key value flag per Config field (underscores become dashes); a bool is --key / --no-key
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=kinds[f.type], default=None, metavar=f.type.upper() if f.type != "str" else "TEXT")
    ev = sub.add_parser("eval", allow_abbrev=False, help="evaluate a checkpoint on its dataset's test set")
    ev.add_argument("--ckpt", default=None, help="default: the latest runs/**/checkpoint.pt")
    ev.add_argument("--workers", type=int, default=None)
    ev.add_argument("--out-dir", default="runs")
    ev.add_argument("--skip-bad-images", action="store_true", help="leave unreadable test images out, and count them")
    q = sub.add_parser("predict", allow_abbrev=False, help="labels and probabilities for your own images")
    q.add_argument("--ckpt", required=True)
    q.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    q.add_argument("--threshold", type=float, default=0.5)
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    for p in (ev, q):
        p.add_argument("--tte", type=int, choices=(1, 5, 10), default=None, help="test-time views (default: the run's)")
        p.add_argument("--device", choices=CHOICES["device"], default="auto")
    t = sub.add_parser("table", allow_abbrev=False, help="a README results table: rows x seeds, mean +- std")
    t.add_argument("table", choices=sorted(TABLES))
    t.add_argument("train_flags", nargs=argparse.REMAINDER, help="train flags for every row, e.g. --data voc-lt")
    sub.add_parser("info", help="versions, device, extension, CLIP models present")
    sub.add_parser("check", help="the fused ops against their references, bf16 vs fp32, DDP, on every device")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train" and args.print_config:
            return print(json.dumps(to_jsonable(dataclasses.asdict(resolve_config(config_from_args(args)))), indent=2))
        if args.command == "train":
            return train_run(config_from_args(args))
        if args.command == "eval":
            return evaluate(args.ckpt, args.tte, args.device, args.out_dir, args.workers, args.skip_bad_images)
        if args.command == "table":
            return run_table(args.table, args.train_flags)
        if args.command == "predict":
            rows = predict(args.ckpt, args.images, args.threshold, args.top_k, args.tte, args.device, args.json, args.batch_size)
            return sys.exit(1) if any("error" in r for r in rows) else rows  # scripts notice an unreadable file
        if args.command == "check":  # with the speed harness, which exercises the same kernels: bench.py --check
            bench = [sys.executable, str(Path(__file__).resolve().parent / "bench.py"), "--check"]
            return sys.exit(subprocess.run(bench).returncode)
        return info()
    except (RunError, ValueError, OSError) as e:  # OSError: missing files, unreadable images
        # user errors: the message says what to do; CAPNET_DEBUG=1 shows the traceback
        if os.environ.get("CAPNET_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

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

# Label graph (SPEC 1 step 3). The graph comes from the frozen text encoder, not from the
# imbalanced training labels: tail classes get neighbours because their names are similar to
# others, not because they co-occur often (they rarely do). `cooccur` and `identity` are the
# ablations.
GRAPH_MODES = ("text", "cooccur", "identity")
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


def prompt_name(name):
    """A class name as it is written into a prompt: underscores become spaces."""
    return name.replace("_", " ")


@torch.no_grad()
def zero_shot_text_features(clip, classnames, templates=ZERO_SHOT_TEMPLATES, chunk=256):
    """g_c = normalize(mean_t normalize(E_T(template_t(name_c)))): plain CLIP's class embeddings.

    This is both the zero-shot baseline's classifier and the node features of the text graph.
    """
    device = clip.token_embedding.weight.device
    texts = [t.format(prompt_name(name)) for name in classnames for t in templates]
    for name in classnames:  # fail with the class named, not deep inside the tokenizer
        if len(_tokenizer().encode(templates[0].format(prompt_name(name)))) + 2 > clip.context_length:
            raise ValueError(f"class name {name!r} does not fit CLIP's context length "
                             f"{clip.context_length} in the prompt {templates[0]!r}")
    feats = []
    for i in range(0, len(texts), chunk):  # chunks bound the memory for 1000s of classes
        tokens = tokenize(texts[i:i + chunk], context_length=clip.context_length).to(device)
        feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))  # (n, D)
    feats = torch.cat(feats).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(feats.mean(dim=1), dim=-1)  # (C, D)


def reweight_graph(A, p):
    """P = (1 - p) I + p A: keep weight 1 - p on the class itself, spread p over its
    neighbours (ML-GCN's re-weighting, which stops over-smoothing). A rows sum to 1, or are
    all zero for a class with no neighbour, which then gets the identity row."""
    C = A.shape[0]
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    has_neighbour = A.sum(dim=1, keepdim=True) > 0  # (C, 1)
    return torch.where(has_neighbour, (1 - p) * eye + p * A, eye)  # (C, C)


def text_graph(G, s, p):
    """A_ij = softmax_{j != i}(s * S_ij) with S = G G^T; P = (1 - p) I + p A."""
    C = G.shape[0]
    S = G @ G.T  # (C, C) cosine similarities of the class embeddings
    logits = (s * S).masked_fill(torch.eye(C, dtype=torch.bool, device=G.device), float("-inf"))
    A = torch.softmax(logits, dim=1) if C > 1 else torch.zeros_like(S)  # one class: no neighbour
    return reweight_graph(A, p)


def cooccur_graph(targets, p, threshold=0.4):
    """ML-GCN: P(j|i) = n_ij / n_i from the training labels, binarised at `threshold`
    (>= counts as an edge), row-normalised, then P = (1 - p) I + p A."""
    Y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)  # (N, C)
    n_ij = Y.T @ Y  # (C, C) co-occurrence counts
    n_i = n_ij.diagonal().clamp(min=1)  # a class with no image has no edge (0 / 1 = 0)
    cond = n_ij / n_i[:, None]  # (C, C) P(j | i)
    B = (cond >= threshold).double()
    B.fill_diagonal_(0)  # the self-loop is added by the (1 - p) I term
    A = B / B.sum(dim=1, keepdim=True).clamp(min=1)  # rows of 1s / degree, or all zero
    return reweight_graph(A, p)


def build_label_graph(mode, clip, classnames, train_targets, s=10.0, p=0.2, threshold=0.4):
    """The propagation matrix P (C, C), float32 on the CPU, rows summing to 1."""
    if mode == "text":
        P = text_graph(zero_shot_text_features(clip, classnames).double().cpu(), s, p)
    elif mode == "cooccur":
        if train_targets is None:
            raise ValueError("graph mode 'cooccur' needs the training labels (train_targets)")
        P = cooccur_graph(train_targets, p, threshold)
    elif mode == "identity":
        P = torch.eye(len(classnames), dtype=torch.float64)
    else:
        raise ValueError(f"unknown graph mode {mode!r}; expected one of {GRAPH_MODES}")
    return P.float()


def graph_stats(P, classnames, counts, n_rare=5, n_top=3):
    """A few lines about P: how much weight goes to neighbours, and who the rarest classes
    borrow from (the point of the text graph)."""
    P = torch.as_tensor(P, dtype=torch.float64).cpu()
    C = P.shape[0]
    off = P - torch.diag(P.diagonal())  # (C, C) neighbour weights only
    lines = [f"label graph: {C} classes, mean neighbour weight per class {off.sum(1).mean():.3f}, "
             f"mean self weight {P.diagonal().mean():.3f}, "
             f"edges > 1/C: {int((off > 1.0 / C).sum())}"]
    for i in np.argsort(np.asarray(counts), kind="stable")[:min(n_rare, C)]:
        w, j = off[i].topk(min(n_top, C - 1)) if C > 1 else (off[i][:0], off[i][:0].long())
        nbrs = ", ".join(f"{classnames[k]} {v:.3f}" for v, k in zip(w.tolist(), j.tolist()) if v > 0)
        lines.append(f"  {classnames[i]} (n={int(counts[i])}): {nbrs or 'no neighbours'}")
    return "\n".join(lines)


class GCN(nn.Module):
    """Three-layer residual GCN (SPEC 1 step 4):
    H1 = LeakyReLU(P F_t W0), H2 = LeakyReLU(P H1 W1), F_hat = F_t + P H2 W2.
    W2 starts at zero, so the untrained GCN is the identity on F_t."""

    def __init__(self, dim, P, negative_slope=0.2, backend="auto"):
        super().__init__()
        self.register_buffer("P", torch.as_tensor(P, dtype=torch.float32).clone())  # (C, C)
        # our choice: W0, W1 ~ N(0, 1/D) keep the feature norm roughly constant layer to layer
        self.W0 = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))  # (D, D)
        self.W1 = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))  # (D, D)
        self.W2 = nn.Parameter(torch.zeros(dim, dim))  # (D, D) zero: F_hat = F_t at the start
        self.negative_slope = negative_slope
        self.backend = backend

    def forward(self, F_t):
        P = self.P.to(F_t.dtype)
        kw = dict(negative_slope=self.negative_slope, backend=self.backend)
        H1 = graph_propagate(P, F_t, self.W0.to(F_t.dtype), activation=True, **kw)  # (C, D)
        H2 = graph_propagate(P, H1, self.W1.to(F_t.dtype), activation=True, **kw)  # (C, D)
        dF = graph_propagate(P, H2, self.W2.to(F_t.dtype), activation=False, **kw)  # (C, D)
        return F_t + dF  # (C, D)


# Prompt learner (SPEC 1 step 2, as in LMPT/CoOp with class-specific context).

class PromptLearner(nn.Module):
    """Class c is read by the text encoder as [SOT] v_1^c .. v_M^c <name_c> . [EOT].

    The M context vectors of every class are learned; all other token embeddings are the
    frozen CLIP's. With `ctx_init` (e.g. "a photo of a") every class's context starts as that
    template's token embeddings and M is the template's token count (CoOp's convention;
    `n_ctx` is then ignored), so the untrained prompts read exactly "a photo of a {name}."
    """

    def __init__(self, clip, classnames, n_ctx=16, ctx_init=""):
        super().__init__()
        # a reference, not a submodule: the frozen CLIP is registered once, under CAPNet.clip
        object.__setattr__(self, "clip", clip)
        device = clip.token_embedding.weight.device
        bpe = _tokenizer()
        init_ids = bpe.encode(ctx_init) if ctx_init else []
        if ctx_init and not init_ids:
            raise ValueError(f"ctx_init {ctx_init!r} has no tokens")
        M = len(init_ids) if ctx_init else n_ctx
        if M < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        sot, eot = tokenize([""])[0, :2].tolist()  # [SOT] [EOT] of the empty text
        rows, eot_index = [], []
        for name in classnames:
            name_ids = bpe.encode(prompt_name(name) + ".")
            ids = [sot] + [0] * M + name_ids + [eot]  # the zeros are replaced by the context
            if len(ids) > clip.context_length:
                raise ValueError(f"the prompt of class {name!r} needs {len(ids)} tokens ({M} context "
                                 f"+ {len(name_ids)} for the name + SOT/EOT), more than CLIP's "
                                 f"context length {clip.context_length}; shorten the name or --n-ctx")
            rows.append(ids)
            eot_index.append(len(ids) - 1)
        # the text encoder is causal: positions after the last EOT never matter, so keep only
        # max(EOT) + 1 positions (SPEC 7: same features, a fraction of the work)
        L = max(eot_index) + 1
        token_ids = torch.zeros(len(classnames), L, dtype=torch.long)  # (C, L)
        for c, ids in enumerate(rows):
            token_ids[c, :len(ids)] = torch.tensor(ids)
        token_ids = token_ids.to(device)
        with torch.no_grad():
            emb = clip.token_embedding(token_ids).float()  # (C, L, W)
            if ctx_init:
                init = clip.token_embedding(torch.tensor(init_ids, device=device)).float()  # (M, W)
                ctx = init.unsqueeze(0).repeat(len(classnames), 1, 1)  # (C, M, W)
            else:
                ctx = torch.randn(len(classnames), M, emb.shape[-1], device=device) * 0.02  # (C, M, W)
        self.n_ctx = M
        self.ctx = nn.Parameter(ctx)  # (C, M, W)
        # frozen pieces, rebuilt from CLIP on load, so not saved in checkpoints
        self.register_buffer("token_ids", token_ids, persistent=False)  # (C, L)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, W) SOT
        self.register_buffer("suffix", emb[:, 1 + M:].clone(), persistent=False)  # (C, L-1-M, W)
        self.register_buffer("eot_index", torch.tensor(eot_index, device=device), persistent=False)  # (C,)

    def embeddings(self):
        """Token embeddings of the prompts (without positional embeddings): (C, L, W)."""
        dtype = self.clip.token_embedding.weight.dtype
        return torch.cat([self.prefix, self.ctx, self.suffix], dim=1).to(dtype)  # (C, L, W)

    def forward(self):
        x = self.clip.encode_text_embeddings(self.embeddings(), self.eot_index)  # (C, D)
        return F.normalize(x.float(), dim=-1)  # (C, D) F_t


# PEFT on the image tower (SPEC 1 step 5).

def adapter_bottleneck(num_classes, num_layers):
    """LIFT's rule: r = 2^max(0, floor(log2(C / (2 L))))."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * num_layers))))


class AdaptFormer(nn.Module):
    """s_a * Up(ReLU(Down(LN_a(h)))), run in parallel with a block's MLP."""

    def __init__(self, width, r):
        super().__init__()
        self.ln = nn.LayerNorm(width)  # LN_a
        self.down = nn.Linear(width, r)
        self.up = nn.Linear(r, width)
        nn.init.zeros_(self.up.weight)  # zero: the adapted tower starts as the frozen one
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(()))  # s_a

    def forward(self, h):
        return self.scale * self.up(F.relu(self.down(self.ln(h))))


class AdaptFormerBlock(ResidualAttentionBlock):
    """A ViT block with an AdaptFormer beside its MLP:
    h = x + Attn(LN1(x)); out = h + MLP(LN2(h)) + s_a * Up(ReLU(Down(LN_a(h)))).
    Made by `add_adaptformer` from an existing block, keeping its (frozen, OpenAI-named)
    submodules in place; the adapter's parameters live under `.adapter`."""

    def forward(self, x):
        h = x + self.attention(self.ln_1(x))
        return h + self.mlp(self.ln_2(h)) + self.adapter(h)


def add_adaptformer(visual, num_classes, adapter_dim=0):
    """Put an AdaptFormer beside the MLP of every block of a ViT image tower, in place.
    Returns the bottleneck r."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"AdaptFormer needs a ViT image tower, got {type(visual).__name__}")
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    r = adapter_dim if adapter_dim > 0 else adapter_bottleneck(num_classes, len(blocks))
    ref = visual.conv1.weight
    for block in blocks:
        # swap the block's class so its forward gains the adapter; the object, its frozen
        # submodules and their parameter names (what OpenAI checkpoints load into) stay as they are
        block.__class__ = AdaptFormerBlock
        block.adapter = AdaptFormer(width, r).to(device=ref.device, dtype=ref.dtype)
    return r


def bias_tuning_parameters(visual):
    """ResNet bias tuning: every BatchNorm bias and the attention pool's projection biases."""
    params = [m.bias for m in visual.modules() if isinstance(m, nn.BatchNorm2d)]
    pool = visual.attnpool
    return params + [pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias, pool.c_proj.bias]


def enable_bias_tuning(visual):
    if not isinstance(visual, ModifiedResNet):
        raise ValueError(f"bias tuning needs a ResNet image tower, got {type(visual).__name__}")
    for param in bias_tuning_parameters(visual):
        param.requires_grad_(True)


# The model (SPEC 1 steps 5, 6, 9).
LOGIT_SCALE_MAX = math.log(100.0)  # t <= ln(100), as in CLIP's training


class CAPNet(nn.Module):
    """logits z_c = exp(t) * cos(normalize(E_I(x)), F_hat_c), F_hat = GCN(PromptLearner())."""

    def __init__(self, clip, classnames, cfg, class_freq=None, train_targets=None):
        super().__init__()
        if len(classnames) == 0:
            raise ValueError("CAPNet needs at least one class")
        if cfg.peft not in ("adaptformer", "none"):
            raise ValueError(f"unknown peft {cfg.peft!r}; expected 'adaptformer' or 'none'")
        self.classnames = list(classnames)
        self.clip = clip.eval()
        for param in clip.parameters():
            param.requires_grad_(False)  # frozen backbone (step 1)
        self.prompt_learner = PromptLearner(clip, classnames, cfg.n_ctx, cfg.ctx_init)
        P = build_label_graph(cfg.graph, clip, classnames, train_targets, cfg.s, cfg.p,
                              cfg.cooccur_threshold)
        self.gcn = GCN(clip.embed_dim, P, cfg.negative_slope, cfg.backend).to(clip.token_embedding.weight.device)
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().float().clone())  # t
        self.peft = "none"
        if cfg.peft == "adaptformer" and isinstance(clip.visual, VisionTransformer):
            self.adapter_dim = add_adaptformer(clip.visual, len(classnames), cfg.adapter_dim)
            self.peft = "adaptformer"
        elif cfg.peft == "adaptformer":  # the --peft adaptformer default means bias tuning on ResNets
            enable_bias_tuning(clip.visual)
            self.peft = "bias"
        self._text_cache = None  # (key, F_hat) in eval mode

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: BatchNorm keeps its running statistics even in training
        self._text_cache = None
        return self

    def trainable_parts(self):
        """Everything that trains (step 9), by part."""
        peft = [p for n, p in self.clip.visual.named_parameters() if ".adapter." in n]
        if self.peft == "bias":
            peft = bias_tuning_parameters(self.clip.visual)
        return {"prompts": [self.prompt_learner.ctx],
                "gcn": [self.gcn.W0, self.gcn.W1, self.gcn.W2],
                "temperature": [self.logit_scale],
                "peft": peft}

    def no_decay_parameters(self):
        """Parameters trained without weight decay: the temperature and the adapter scales."""
        scales = [m.scale for m in self.clip.visual.modules() if isinstance(m, AdaptFormer)]
        return {self.logit_scale, *scales}

    def trainable_summary(self):
        """A table of trainable parameter counts by part, and the frozen rest."""
        parts = self.trainable_parts()
        counts = {k: sum(p.numel() for p in v) for k, v in parts.items()}
        trainable = sum(counts.values())
        total = sum(p.numel() for p in self.parameters())
        peft = {"adaptformer": "peft (AdaptFormer)", "bias": "peft (bias tuning)"}.get(self.peft, "peft (none)")
        names = {"prompts": "prompts", "gcn": "gcn", "temperature": "temperature", "peft": peft}
        lines = [f"{names[k]:<20} {v:>12,}" for k, v in counts.items()]
        lines += [f"{'trainable':<20} {trainable:>12,}",
                  f"{'frozen (CLIP)':<20} {total - trainable:>12,}"]
        return "\n".join(lines)

    def clamp_temperature_(self):
        """Keep t <= ln(100) in the parameter itself (call after each optimizer step): the
        clamp in forward alone would leave t stuck above the bound with zero gradient."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=LOGIT_SCALE_MAX)

    def class_features(self):
        """F_hat (C, D). In eval mode the prompts are fixed, so it is computed once (SPEC 7);
        the cache key holds the parameters' storage and version counters, so loading a state
        dict, an optimizer step or a device move recomputes it."""
        if self.training:
            return self.gcn(self.prompt_learner())
        params = [self.prompt_learner.ctx, self.gcn.W0, self.gcn.W1, self.gcn.W2, self.gcn.P]
        key = tuple((p.data_ptr(), p._version) for p in params) + (torch.is_autocast_enabled(),)
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.gcn(self.prompt_learner()))
        return self._text_cache[1]

    def forward(self, images):
        v = F.normalize(self.clip.encode_image(images).float(), dim=-1)  # (B, D)
        F_hat = F.normalize(self.class_features().float(), dim=-1)  # (C, D)
        t = self.logit_scale.clamp(max=LOGIT_SCALE_MAX)
        return t.exp() * v @ F_hat.T  # (B, C)


# -----------------------------------------------------------------------------
# losses

# The DB-focal loss itself (SPEC 3) is `db_focal_loss` in the fused-op section; here are the
# class-aware weights and the loss the trainer uses.
LOSSES = ("db-focal", "bce", "focal")


def class_aware_weights(class_freq, tau_prime):
    """class_weight_c = C * softmax_c(-log(n_c) / tau'): rarer classes weigh more, the mean
    weight is 1; tau' = inf turns it off (all ones)."""
    n = torch.as_tensor(np.asarray(class_freq), dtype=torch.float64)  # (C,)
    if (n <= 0).any():
        c = int((n <= 0).nonzero()[0])
        raise ValueError(f"class {c} has no training image: class-aware weights are undefined")
    if not tau_prime > 0:
        raise ValueError(f"tau_prime must be > 0 (or inf to turn re-weighting off), got {tau_prime}")
    if math.isinf(tau_prime):
        return torch.ones(len(n), dtype=torch.float32)
    return (len(n) * torch.softmax(-n.log() / tau_prime, dim=0)).float()  # (C,)


def focal_loss(logits, targets, gamma=2.0):
    """Plain sigmoid focal loss, mean over B*C: (1 - p_t)^gamma * BCE (ablation)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, C)
    return ((1 - torch.exp(-bce)) ** gamma * bce).mean()


def make_criterion(cfg, class_freq, num_images):
    """fn(logits (B, C), targets (B, C)) -> scalar, the training loss chosen by cfg.loss."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {LOSSES}")
    if cfg.loss == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets)
    if cfg.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.gamma)
    freq = torch.as_tensor(np.asarray(class_freq), dtype=torch.float32)  # (C,)
    weight = class_aware_weights(freq, cfg.tau_prime)  # checks the counts too

    def criterion(logits, targets):
        return db_focal_loss(logits, targets, freq.to(logits.device), num_images,
                             alpha=cfg.alpha, beta=cfg.beta, mu=cfg.mu, kappa=cfg.kappa,
                             lam=cfg.lam, gamma=cfg.gamma, balance=cfg.balance,
                             class_weight=weight.to(logits.device), backend=cfg.backend)
    return criterion


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

# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    main()

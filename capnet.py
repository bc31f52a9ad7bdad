"""
CAPNet: correlation adaptation prompt network for long-tailed multi-label recognition.

A single-file reference implementation (arXiv 2511.20641): CLIP with class-specific soft
prompts, a three-layer residual GCN over a label graph taken from CLIP's text encoder, a
distribution-balanced focal loss with class-aware re-weighting, AdaptFormer (ViT) or bias
tuning (ResNet), and five-crop test-time ensembling.

The file reads top to bottom in the order data flows:
config -> tokenizer -> CLIP -> transforms -> data -> prompts, label graph, GCN, PEFT, model -> loss ->
metrics -> fused-op dispatch -> train -> eval and predict -> CLI.
The speed harness is bench.py; data preparation is data_prep.py (both import this file).

Choices and assumptions (the paper publishes no code; defaults follow its closest ancestors):
see README.md, "Choices and assumptions".
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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
    ctx: str = "class"                # class: M vectors per class (CAPNet, LMPT) | shared: one (M, W) set (CoOp)
    # label graph and GCN (steps 3, 4)
    graph: str = "text"               # text | cooccur | identity (GCN as a per-class MLP) | none (no GCN)
    s: float = 10.0                   # s, sharpness of the text-similarity softmax
    p: float = 0.2                    # p, neighbour weight in P = (1 - p) I + p A
    cooccur_threshold: float = 0.4    # ML-GCN binarisation threshold of P(j|i) (graph=cooccur)
    negative_slope: float = 0.2       # LeakyReLU slope between GCN layers
    # PEFT (step 5)
    peft: str = "adaptformer"         # adaptformer (ViT) / bias tuning (ResNet) | none | full (all of CLIP)
    clip_lr_scale: float = 0.1        # --peft full: CLIP's own weights train at lr * this (ours: gentler than prompts)
    adapter_dim: int = 0              # r, AdaptFormer bottleneck (0 = LIFT rule)
    # loss (section 3)
    loss: str = "db-focal"            # db-focal | bce | focal | asl
    alpha: float = 0.1                # alpha, rebalance weight floor
    beta: float = 10.0                # beta, rebalance sigmoid steepness
    mu: float = 0.2                   # mu, rebalance sigmoid centre
    kappa: float = 0.05               # kappa, NTR bias scale
    lam: float = 2.0                  # lambda, NTR negative-logit scale
    gamma: float = 2.0                # gamma, focal exponent
    balance: float = 2.0              # overall loss scale of the DB-focal term
    tau_prime: float = 4.0            # tau', class-aware re-weighting temperature (inf = off)
    asl_gamma_pos: float = 0.0        # ASL gamma+, focusing on positives (Ridnik et al. 2021)
    asl_gamma_neg: float = 4.0        # ASL gamma-, focusing on negatives
    asl_clip: float = 0.05            # ASL probability margin m: negatives use max(p - m, 0)
    # optimisation (section 6)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4        # not on the temperature and adapter scales
    prompt_weight_decay: float = -1.0  # weight decay of the prompt context vectors (< 0: --weight-decay)
    warmup_epochs: float = 1.0
    temperature_lr_scale: float = 0.01  # lr of t = lr * this (ours: at the full lr t collapses)
    # images
    input_size: int = 224             # crop size fed to the image tower
    scale_min: float = 0.5            # random resized crop scale range (scale_min, 1)
    sampler: str = "uniform"          # uniform: each image once per epoch | class-aware: inverse-frequency draws
    sampler_power: float = 1.0        # q: class-aware weight of image i = sum_c y_ic n_c^-q
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
    ckpt_every: int = 0               # extra checkpoint every this many steps (0: end of each epoch only)


# per-benchmark presets: only what differs from the Config defaults
PRESETS = {
    # the embedded default: 48 px scenes and a small ViT CLIP (data_prep.make_synthetic_lt), sized so
    # preparation + training + both evaluations fit in 10 minutes on 2 CPU cores. The context starts
    # from "a photo of a", so step 0 is exactly zero-shot. Measured on synthetic-lt v2 (seed 0, two
    # draws of the world): 60 epochs at lr 0.01 gained 1.2-1.4 mAP over 30 at 0.005; 30 at 0.02
    # fell below zero-shot. (v1: 0.01 for 30 epochs lost 10 points; random context init was worse)
    # Prompt weight decay 0.02 (40x the 5e-4 that GCN and adapters keep): at 5e-4 everywhere the 1,500
    # train images are fitted to loss ~0.03 by epoch 10 and the result depends on the draw (world seed 2:
    # 38.4-43.9 mAP over training seeds, below zero-shot 45.5; crab 59 -> 14 AP). Decay on the 9,216
    # context numbers shrinks them from norm 0.22 (the template's) to ~0.03, so the prompts cannot
    # memorise the few images of a rare class; on GCN and adapters it hurts (they carry the style shift:
    # world 0, seed 0, 0.02 on all: 49.5 mAP; on the GCN and adapters only: 47.8; on the prompts only: 50.9).
    # README "The synthetic default" has the three worlds.
    "synthetic-lt": dict(input_size=48, epochs=60, batch_size=32, lr=0.01, prompt_weight_decay=0.02, workers=0,
                         ctx_init="a photo of a"),
    "voc-lt": dict(clip="ViT-B/16", mu=0.3, lam=5.0),
    "coco-lt": dict(clip="ViT-B/16"),
    "nus-wide-lt": dict(clip="ViT-B/16"),
}

# --method presets: flags only, laid over the data preset; any flag given still wins. One protocol for
# all (README "Methods and baselines"): sigmoid scores, last epoch, CLIP statistics, same schedule and TTE
METHODS = {
    "capnet": {},
    "zero-shot": dict(epochs=0),  # plain CLIP, "a photo of a {name}.": the trained columns = step-0 zero-shot
    # CoOp (Zhou et al. 2022): one context for all classes; sigmoid BCE, as CoOp's softmax CE is single-label
    "coop": dict(ctx="shared", graph="none", peft="none", loss="bce"),
    # LMPT (Xia et al. 2023, richard-peng-xia/LMPT): class-specific context from "a photo of a", DB-focal
    # without class-aware weights, no random crop (whole image, + flip); its caption loss is left out
    "lmpt": dict(ctx_init="a photo of a", graph="none", peft="none", tau_prime=float("inf"), scale_min=1.0),
}

# -----------------------------------------------------------------------------
# tokenizer

# Byte-level BPE exactly as OpenAI CLIP's SimpleTokenizer (same clean-up, same regex, same
# merges table), re-implemented here. The merges file bpe_simple_vocab_16e6.txt.gz (MIT,
# OpenAI) is vendored at the repository root.


BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|>


@functools.lru_cache()
def _byte_to_unicode():
    """A reversible map of the 256 bytes to printable unicode characters (GPT-2's table):
    printable latin-1 bytes map to themselves, the others to 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


def _clean(text):
    import ftfy
    import regex
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    def __init__(self, bpe_path=BPE_PATH):
        import regex
        if not Path(bpe_path).is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path} "
                                    "(it ships with this repository as bpe_simple_vocab_16e6.txt.gz)")
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48894 merges
        byte_chars = list(_byte_to_unicode().values())
        # vocab order fixes the ids: 256 bytes, 256 word-final bytes, merges, SOT, EOT
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {}
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                     r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, word):
        """Merge the symbols of one pre-token, lowest-rank pair first, until no pair is a merge."""
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return [word]
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols[:-1], symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(_clean(text)):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache()
def _tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """texts -> LongTensor (n, context_length): [SOT] bpe(text) [EOT] 0 0 ...
    A text longer than the context is an error, or with truncate=True cut so that its
    last kept token is EOT (OpenAI's behaviour)."""
    if isinstance(texts, str):
        texts = [texts]
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

# -----------------------------------------------------------------------------
# CLIP

# A from-scratch CLIP with OpenAI's module and parameter names (so their checkpoints load with
# strict=True), batch-first tensors, and attention through scaled_dot_product_attention.
# Deviations from openai/CLIP's model.py, none of which changes a number beyond float rounding:
# batch-first (B, L, D) instead of (L, B, D); SDPA instead of nn.MultiheadAttention; positional
# embeddings resized on the fly for other input sizes; encode_text runs on the shortest causal
# context that holds every EOT; fp32 throughout (no fp16 conversion).

class Bottleneck(nn.Module):
    """ResNet bottleneck, anti-aliased: a stride-s block average-pools (s x s) after conv2 and
    before its 1x1 downsample conv, instead of using strided convolutions."""
    expansion = 4

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
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def resize_pos_embed(pos, grid_hw):
    """pos (1 + g*g, W): a class/pooled-token row then a g x g grid -> (1 + h*w, W) for grid
    (h, w). The grid part is interpolated bicubically (align_corners=False); the first row is
    kept. At the native grid the checkpoint's embedding is returned unchanged."""
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
    """ResNet head: one query (the mean of the feature map) attends over the mean and the
    H*W positions, each with a learned positional embedding."""

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
    """OpenAI's ResNet: a 3-conv stem with an average pool, anti-aliased bottlenecks, and an
    attention pool instead of global average pooling."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.output_dim = output_dim
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


def quick_gelu_reference(x):
    return x * torch.sigmoid(1.702 * x)  # the GELU approximation CLIP was trained with


class QuickGELU(nn.Module):
    fused = True  # capnet::quick_gelu (one pass, fp32 math) where the extension has a kernel

    def forward(self, x):
        if self.fused and _use_ext("auto", x.device, "quick_gelu"):
            return torch.ops.capnet.quick_gelu(x)
        return quick_gelu_reference(x)


def attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(d)) v for (B, H, L, d) heads. scaled_dot_product_attention, except
    bf16 on the CPU: there its flash backward measured 1.5-2x slower than this matmul form at
    ViT-B/16's L = 197, d = 64 (README, Speed; same values within bf16 rounding)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not causal and MATMUL_ATTENTION_BF16_CPU:
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v  # (B, H, L, d)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, d)


MATMUL_ATTENTION_BF16_CPU = True  # the switch bench.py turns off for its baseline


class MultiheadAttention(nn.Module):
    """Self-attention holding nn.MultiheadAttention's parameters (in_proj_weight/in_proj_bias
    packed q, k, v; out_proj) but computing with scaled_dot_product_attention, batch-first."""

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
        out = attention(_heads(q, self.n_head), _heads(k, self.n_head), _heads(v, self.n_head), causal)  # (B, H, L, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, causal=False):
        super().__init__()
        self.causal = causal  # text tower: each position sees itself and the positions before it
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d_model, d_model * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(d_model * 4, d_model))
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
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
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
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        if isinstance(vision_layers, (tuple, list)):
            # OpenAI's convention: 64-dim heads over the 32*width attention-pool features
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64,
                                         image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                            vision_layers, vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (used when training a CLIP from scratch, e.g. synthetic-lt)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(p)  # each residual branch starts as zero
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):
        return self.visual(images.to(self.dtype))  # (B, D)

    def encode_text(self, tokens, truncate=True):
        """tokens (n, L) from tokenize() -> (n, D), read at each sequence's EOT (its largest id)."""
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens.argmax(dim=-1), truncate)

    def encode_text_embeddings(self, x, eot_index, truncate=True):
        """x (n, L, W): token embeddings WITHOUT positional embeddings (the prompt learner splices
        its learned context vectors in here); eot_index (n,): where each sequence's EOT is.
        Returns (n, D). The mask is causal, so positions after the last EOT cannot change any
        output read at or before it: with truncate=True the tower runs on x[:, :max(eot)+1] only,
        the same features for a fraction of the work (SPEC section 7)."""
        n, L, W = x.shape
        if truncate:
            L = int(eot_index.max()) + 1
            x = x[:, :L]
        x = x.to(self.dtype) + self.positional_embedding[:L].to(self.dtype)  # (n, L, W)
        x = self.ln_final(self.transformer(x))  # (n, L, W)
        return x[torch.arange(n, device=x.device), eot_index] @ self.text_projection  # (n, D)

    def forward(self, images, tokens):
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()  # (B, n)
        return logits, logits.t()


_NOT_PARAMETERS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archives


def build_clip(state_dict):
    """OpenAI-layout state dict -> CLIP in fp32, eval mode. Every size is read from tensor shapes
    (as OpenAI's build_model); head counts follow OpenAI's 64 dims per head."""
    sd = {k: v for k, v in state_dict.items() if k not in _NOT_PARAMETERS}
    for key in ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
                "visual.conv1.weight"):
        if key not in sd:
            raise KeyError(f"not a CLIP state dict: missing '{key}'")
    if "visual.proj" in sd:  # ViT
        vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution = patch * grid
    else:  # ResNet
        vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")})
                              for i in (1, 2, 3, 4))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        patch, image_resolution = None, grid * 32
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


def available_models():
    return list(KNOWN_MODELS)


def clip_cache_dir(download_root=None):
    return Path(download_root).expanduser() if download_root else Path("~/.cache/clip").expanduser()


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
    """Known model name -> verified local file root/<file>. The download goes to a temporary
    file in the same folder and is renamed into place only after its SHA-256 matches, so the
    cache never holds a partial or wrong file."""
    url = KNOWN_MODELS[name]
    sha, filename = url.split("/")[-2], url.split("/")[-1]
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


def _read_state_dict(path):
    """A TorchScript archive (OpenAI's release format) or a plain state dict -> {name: tensor}."""
    import zipfile
    try:
        is_script = zipfile.is_zipfile(path) and any(
            n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist())
        if is_script:
            import warnings
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is OpenAI's format
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read CLIP checkpoint {path}: the file is truncated, corrupted or not "
                           f"a TorchScript archive / state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) or isinstance(v, int) for v in sd.values()):
        raise RuntimeError(f"CLIP checkpoint {path} does not hold a state dict (a dict of tensors)")
    return sd


def load_clip(name_or_path, device="cpu", download_root=None):
    """A known model name (available_models(); cached in ~/.cache/clip, downloaded with SHA-256
    check when absent) or a checkpoint path -> CLIP (fp32, eval) with
    model.source = {"name", "sha256"} identifying the exact weights."""
    name_or_path = str(name_or_path)
    if name_or_path in KNOWN_MODELS:
        path, sha = _download(name_or_path, clip_cache_dir(download_root))
    elif Path(name_or_path).expanduser().is_file():
        path = Path(name_or_path).expanduser()
        sha = _sha256(path)
    else:
        raise FileNotFoundError(f"CLIP model '{name_or_path}' is neither a file nor a known model "
                                f"name ({', '.join(available_models())})")
    state_dict = _read_state_dict(path)
    try:
        model = build_clip(state_dict)
    except (KeyError, RuntimeError) as e:
        raise RuntimeError(f"cannot build CLIP from {path}: {e}") from e
    model.source = {"name": name_or_path, "sha256": sha}
    return model.to(device)

# -----------------------------------------------------------------------------
# image transforms

# Written with PIL, numpy and torch (no torchvision). preprocess() reproduces OpenAI's CLIP
# transform (torchvision Resize(size, BICUBIC) of the short side, CenterCrop, RGB, ToTensor,
# Normalize) on PIL images, whose BICUBIC resize antialiases when shrinking.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 10  # longest side / shortest side that reaches the resize (VOC and COCO stay below)


def load_rgb(path, exif=False):
    """Image file -> 8-bit RGB (to_rgb), decoded now: a truncated file or a decompression bomb fails
    here, by name. exif=True (predict) turns users' photos as viewers do; train and eval keep the pixels
    as stored, like openai/CLIP's preprocess behind the published baselines (README, "Your own images")."""
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
    w, h = img.size
    cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)  # (w, h) for any sane image
    if cw <= ch:
        new_w, new_h = size, int(size * ch / cw)
    else:
        new_w, new_h = int(size * cw / ch), size
    from PIL import Image
    return img.resize((new_w, new_h), Image.BICUBIC, box=((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))


def crop(img, top, left, size):
    return img.crop((left, top, left + size, top + size))


def center_crop(img, size):
    w, h = img.size
    return crop(img, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size)  # torchvision rounding


def preprocess(img, size):
    """PIL image -> (3, size, size): OpenAI's CLIP eval transform."""
    return to_tensor(center_crop(resize_short_side(to_rgb(img), size), size))


def train_augment(img, size, rng, scale=(0.5, 1.0)):
    """Random resized crop (torchvision's RandomResizedCrop sampling: area fraction in `scale`,
    log-uniform aspect ratio in [3/4, 4/3], ten tries, then a centre fallback), bicubic resize to
    size x size, horizontal flip with p = 0.5. All randomness from the numpy Generator `rng`,
    so a (seed, epoch, index) triple fixes the view exactly."""
    from PIL import Image
    img = to_rgb(img)
    W, H = img.size
    box = None
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: the whole image, cut to an aspect ratio inside [3/4, 4/3], centred
        w, h = min(W, int(round(H * 4 / 3))), min(H, int(round(W * 4 / 3)))
        top, left = (H - h) // 2, (W - w) // 2
        box = (left, top, left + w, top + h)
    img = img.crop(box).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def tte_views(img, size, n_views=5):
    """Test-time views -> (V, 3, size, size). The short side goes to round(size * 248 / 224)
    (224 -> 248, SPEC section 1 step 8); 5 = the four corner crops and the centre crop (in
    torchvision FiveCrop's order), 10 = those and their mirror images, 1 = the centre crop of
    the same resize (assumption: --tte 1 is one of the five views, so TTE ablations differ in
    the number of views only)."""
    from PIL import Image
    if n_views not in (1, 5, 10):
        raise ValueError(f"n_views must be 1, 5 or 10, got {n_views}")
    img = resize_short_side(to_rgb(img), round(size * 248 / 224))
    W, H = img.size
    if n_views == 1:
        views = [center_crop(img, size)]
    else:
        views = [crop(img, 0, 0, size), crop(img, 0, W - size, size), crop(img, H - size, 0, size),
                 crop(img, H - size, W - size, size), center_crop(img, size)]
    if n_views == 10:
        views += [v.transpose(Image.FLIP_LEFT_RIGHT) for v in views]
    return torch.stack([to_tensor(v) for v in views])  # (V, 3, size, size)

# -----------------------------------------------------------------------------
# data

# Class statistics are always taken from the train split (SPEC section 5). Group rule of the
# VOC-LT / COCO-LT papers: head n >= 100, medium 20 <= n < 100, tail n < 20.
HEAD_MIN = 100
TAIL_MIN = 20
GROUPS = ("total", "head", "medium", "tail")  # the mAP columns of every report


def class_group(n):
    """'head' | 'medium' | 'tail' for a class with n training images."""
    if n >= HEAD_MIN:
        return "head"
    return "medium" if n >= TAIL_MIN else "tail"


@dataclass
class Prepared:
    """A prepared dataset (data/<name>/dataset.json, SPEC section 5), validated."""
    name: str
    classes: list          # class names, index order
    image_root: Path       # absolute folder the relative image paths hang from
    train: list            # [(relpath, [label indices]), ...]
    test: list
    source: dict           # how it was made (free form, from data_prep)


def _check_items(items, split, classes, json_path):
    # every item is [relpath, [distinct int labels in range]]; no image twice
    seen = set()
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (list, tuple))):
            raise ValueError(f"{json_path}: {split}[{i}] is not [relpath, [labels]]: {item!r:.80}")
        relpath, labels = item
        if relpath in seen:
            raise ValueError(f"{json_path}: duplicate image {relpath!r} in {split}")
        seen.add(relpath)
        for label in labels:
            if not isinstance(label, int) or isinstance(label, bool):
                raise ValueError(f"{json_path}: {split} image {relpath!r} has a non-integer label {label!r}")
            if not 0 <= label < len(classes):
                raise ValueError(f"{json_path}: {split} image {relpath!r} has label {label}, "
                                 f"out of range for {len(classes)} classes (0..{len(classes) - 1})")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{json_path}: {split} image {relpath!r} repeats a label: {labels}")
        out.append((relpath, list(labels)))
    return out, seen


def load_prepared(path):
    """Read and validate a dataset.json (SPEC sections 5 and 8); every error names the bad thing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prepared dataset at {path} (make it with data_prep.py, see README)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("name", "classes", "image_root", "train", "test"):
        if key not in d:
            raise ValueError(f"{path}: missing key {key!r}")
    classes = d["classes"]
    if not isinstance(classes, list) or len(classes) == 0:
        raise ValueError(f"{path}: empty class list")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{path}: class {i} has no name: {c!r}")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate class name(s) {dup}")
    train, train_set = _check_items(d["train"], "train", classes, path)
    test, test_set = _check_items(d["test"], "test", classes, path)
    if not train:
        raise ValueError(f"{path}: the train split is empty")
    if not test:
        raise ValueError(f"{path}: the test split is empty")
    both = sorted(train_set & test_set)
    if both:
        raise ValueError(f"{path}: {len(both)} image(s) in both train and test, e.g. {both[0]!r}")
    # the DB loss needs n_c > 0 (r_bc = (1/n_c) / ...), and AP of an unseen class says nothing
    counts = class_counts(train, len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"{path}: class {empty[0]!r} has no training image"
                         + (f" (also {empty[1:]})" if len(empty) > 1 else ""))
    root = Path(d["image_root"])
    if not root.is_absolute():
        root = path.parent / root  # relative roots hang from the json's folder
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
    n = np.zeros(num_classes, np.int64)
    for _, labels in items:
        n[list(labels)] += 1
    return n


def format_class_stats(classes, counts, num_images=None):
    """Readable class statistics: images, classes, head/medium/tail sizes, per-class counts."""
    counts = np.asarray(counts)
    groups = [class_group(int(n)) for n in counts]
    lines = []
    if num_images is not None:
        lines.append(f"images: {num_images}")
    lines.append(f"classes: {len(classes)}  (head n>={HEAD_MIN}: {groups.count('head')}, "
                 f"medium {TAIL_MIN}<=n<{HEAD_MIN}: {groups.count('medium')}, "
                 f"tail n<{TAIL_MIN}: {groups.count('tail')})")
    lines.append(f"labels per class: max {counts.max()}, median {int(np.median(counts))}, min {counts.min()}, "
                 f"imbalance {counts.max() / max(counts.min(), 1):.1f}")
    width = max(len(c) for c in classes)
    for i in np.argsort(-counts, kind="stable"):
        lines.append(f"  {i:4d} {classes[i]:<{width}} {counts[i]:7d}  {groups[i]}")
    return "\n".join(lines)


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images and multi-hot targets.

    mode="train": random resized crop + flip (train_augment), one (3, S, S) tensor per item, drawn
    from np.random.default_rng([seed, epoch, index]) so a resumed run sees the same crops.
    mode="eval": the test-time views (tte_views), a (V, 3, S, S) tensor per item.
    skip_bad: an unreadable image gives None (dropped by collate_skip_bad) and is counted in
    bad_count (shared with DataLoader workers), instead of an error naming the file.
    """

    def __init__(self, items, image_root, num_classes, size, mode="train", n_views=5,
                 scale_min=0.5, seed=0, skip_bad=False):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
        self.items = list(items)
        self.image_root = Path(image_root)
        self.targets = multihot(self.items, num_classes)  # (N, C)
        self.size, self.mode, self.n_views = size, mode, n_views
        self.scale_min, self.seed, self.skip_bad = scale_min, seed, skip_bad
        self.epoch = 0
        # a shared counter: with DataLoader workers each process holds its own copy of the dataset
        self._bad = torch.multiprocessing.get_context().Value("i", 0) if skip_bad else None

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def bad_count(self):
        return self._bad.value if self._bad is not None else 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        relpath, _ = self.items[index]
        try:
            img = load_rgb(self.image_root / relpath)
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

# -----------------------------------------------------------------------------
# prompt learner, label graph, GCN, PEFT, CAPNet

# Prompt learner (SPEC 1 step 2, as in LMPT/CoOp with class-specific context).

def prompt_name(name):
    """A class name as it is written into a prompt: underscores become spaces."""
    return name.replace("_", " ")


class PromptLearner(nn.Module):
    """Class c is read by the text encoder as [SOT] v_1^c .. v_M^c <name_c> . [EOT].

    The M context vectors of every class are learned; all other token embeddings are the
    frozen CLIP's. With `ctx_init` (e.g. "a photo of a") every class's context starts as that
    template's token embeddings and M is the template's token count (CoOp's convention;
    `n_ctx` is then ignored), so the untrained prompts read exactly "a photo of a {name}."
    With `shared` (CoOp) one (M, W) context serves every class instead of a (C, M, W) tensor.
    """

    def __init__(self, clip, classnames, n_ctx=16, ctx_init="", shared=False):
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
        rows, eot_index = [], []
        for name in classnames:
            name_ids = bpe.encode(prompt_name(name) + ".")
            ids = [SOT] + [0] * M + name_ids + [EOT]  # the zeros are replaced by the context
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
            shape = (M, emb.shape[-1]) if shared else (len(classnames), M, emb.shape[-1])
            if ctx_init:
                init = clip.token_embedding(torch.tensor(init_ids, device=device)).float()  # (M, W)
                ctx = init.expand(shape).clone()  # (C, M, W), or (M, W) shared
            else:
                ctx = torch.randn(shape, device=device) * 0.02  # (C, M, W), or (M, W) shared
        self.n_ctx = M
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

    truncate = True  # False: run all 77 positions as openai/CLIP does (same output; bench baseline)

    def forward(self):
        x = self.embeddings()  # (C, L, W), L = max(EOT) + 1: already the shortest causal context
        if not self.truncate:
            x = F.pad(x, (0, 0, 0, self.clip.context_length - x.shape[1]))  # (C, 77, W)
        # truncate=False: no data-dependent cut (int(eot.max())), so torch.compile sees one graph
        x = self.clip.encode_text_embeddings(x, self.eot_index, truncate=False)  # (C, D)
        return F.normalize(x.float(), dim=-1)  # (C, D) F_t


# Label graph (SPEC 1 step 3). The graph comes from the frozen text encoder, not from the
# imbalanced training labels: tail classes get neighbours because their names are similar to
# others, not because they co-occur often (they rarely do). `cooccur` and `identity` are the
# ablations.
GRAPH_MODES = ("text", "cooccur", "identity", "none")  # none: no GCN at all (CAPNet freezes it)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


@torch.no_grad()
def zero_shot_text_features(clip, classnames, templates=ZERO_SHOT_TEMPLATES, chunk=256):
    """g_c = normalize(mean_t normalize(E_T(template_t(name_c)))): plain CLIP's class embeddings.

    This is both the zero-shot baseline's classifier and the node features of the text graph.
    """
    device = clip.token_embedding.weight.device
    texts = [t.format(prompt_name(name)) for name in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), chunk):  # chunks bound the memory for 1000s of classes
        # a prompt too long for the context is tokenize's error, which quotes the text
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
    elif mode in ("identity", "none"):
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
        w, j = off[i].topk(min(n_top, C - 1))
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
        kw = dict(negative_slope=self.negative_slope, backend=self.backend)
        H1 = graph_propagate(self.P, F_t, self.W0, activation=True, **kw)  # (C, D)
        H2 = graph_propagate(self.P, H1, self.W1, activation=True, **kw)  # (C, D)
        dF = graph_propagate(self.P, H2, self.W2, activation=False, **kw)  # (C, D)
        return F_t + dF  # (C, D)


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
        h = x + self.attn(self.ln_1(x), causal=self.causal)  # (B, L, W)
        return h + self.mlp(self.ln_2(h)) + self.adapter(h)  # (B, L, W)


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

    def __init__(self, clip, classnames, cfg, train_targets=None):
        super().__init__()
        if len(classnames) == 0:
            raise ValueError("CAPNet needs at least one class")
        if cfg.peft not in ("adaptformer", "none", "full"):
            raise ValueError(f"unknown peft {cfg.peft!r}; expected 'adaptformer', 'none' or 'full'")
        self.classnames = list(classnames)
        self.clip = clip.eval()
        for param in clip.parameters():
            param.requires_grad_(cfg.peft == "full")  # frozen backbone (step 1), unless fully fine-tuned
        self.prompt_learner = PromptLearner(clip, classnames, cfg.n_ctx, cfg.ctx_init, cfg.ctx == "shared")
        P = build_label_graph(cfg.graph, clip, classnames, train_targets, cfg.s, cfg.p,
                              cfg.cooccur_threshold)
        device = clip.token_embedding.weight.device
        self.gcn = GCN(clip.embed_dim, P, cfg.negative_slope, cfg.backend).to(device)
        if cfg.graph == "none":  # no GCN (CoOp, LMPT): frozen with W2 = 0, so F_hat = F_t exactly
            self.gcn.requires_grad_(False)
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().float().clone())  # t
        self.peft, self.adapter_dim = ("full" if cfg.peft == "full" else "none"), 0
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
        if self.peft == "full":  # the fine-tuning baseline: every CLIP weight, text tower included
            peft = list(self.clip.parameters())
        return {"prompts": [self.prompt_learner.ctx],
                "gcn": [w for w in (self.gcn.W0, self.gcn.W1, self.gcn.W2) if w.requires_grad],
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
        peft = {"adaptformer": "peft (AdaptFormer)", "bias": "peft (bias tuning)",
                "full": "peft (all of CLIP)"}.get(self.peft, "peft (none)")
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
        autocast = torch.is_autocast_enabled(self.logit_scale.device.type)
        key = tuple((p.data_ptr(), p._version) for p in params) + (autocast,)
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.gcn(self.prompt_learner()))
        return self._text_cache[1]

    def forward(self, images):
        v = F.normalize(self.clip.encode_image(images).float(), dim=-1)  # (B, D)
        F_hat = F.normalize(self.class_features().float(), dim=-1)  # (C, D)
        t = self.logit_scale.clamp(max=LOGIT_SCALE_MAX)
        # the head is tiny, so it runs in fp32 even under autocast: logits and loss stay fp32
        with torch.autocast(v.device.type, enabled=False):
            return t.exp() * v @ F_hat.T  # (B, C)


# -----------------------------------------------------------------------------
# losses

# The DB-focal loss itself (SPEC 3) is `db_focal_loss` in the fused-op section; here are the
# class-aware weights and the loss the trainer uses.
LOSSES = ("db-focal", "bce", "focal", "asl")


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


def asymmetric_loss(logits, targets, gamma_pos=0.0, gamma_neg=4.0, clip=0.05):
    """ASL (Ridnik et al. 2021), mean over B*C like every loss here (the paper's code sums):
    -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0); gradients flow through
    the focusing weights too. log is clamped at 1e-8 as in the paper's code."""
    p = torch.sigmoid(logits)  # (B, C)
    p_m = (p - clip).clamp(min=0)  # (B, C) shifted probability: easy negatives (p <= clip) cost nothing
    pos = (1 - p) ** gamma_pos * torch.log(p.clamp(min=1e-8))  # (B, C)
    neg = p_m ** gamma_neg * torch.log((1 - p_m).clamp(min=1e-8))  # (B, C)
    return -(targets * pos + (1 - targets) * neg).mean()


def make_criterion(cfg, class_freq, num_images):
    """fn(logits (B, C), targets (B, C)) -> scalar, the training loss chosen by cfg.loss."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {LOSSES}")
    if cfg.loss == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets)
    if cfg.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.gamma)
    if cfg.loss == "asl":
        return lambda logits, targets: asymmetric_loss(logits, targets, cfg.asl_gamma_pos, cfg.asl_gamma_neg,
                                                       cfg.asl_clip)
    freq = torch.as_tensor(np.asarray(class_freq), dtype=torch.float32)  # (C,)
    weight = class_aware_weights(freq, cfg.tau_prime)  # checks that every class has an image
    if (freq >= num_images).any():  # the NTR bias needs log(N / n_c - 1) finite
        c = int((freq >= num_images).nonzero()[0])
        raise ValueError(f"class {c} is in every training image ({int(freq[c])} of {num_images}): "
                         f"the DB-focal NTR bias log(N / n - 1) is undefined; use --loss bce or focal")

    # the focal factor is per element (SPEC 3, as Wu et al.); LMPT's released code (dbl.py) takes it
    # from the batch-mean BCE, one scalar per batch: --method lmpt keeps the elementwise form
    def criterion(logits, targets):
        return db_focal_loss(logits, targets, freq.to(logits.device), num_images,
                             alpha=cfg.alpha, beta=cfg.beta, mu=cfg.mu, kappa=cfg.kappa,
                             lam=cfg.lam, gamma=cfg.gamma, balance=cfg.balance,
                             class_weight=weight.to(logits.device), backend=cfg.backend)
    return criterion


# -----------------------------------------------------------------------------
# metrics

def average_precision(scores, targets):
    """Per-class average precision -> (C,) float64 tensor; NaN for a class with no positive.

    Exactly scikit-learn's average_precision_score (one class at a time): AP = sum_k (R_k - R_{k-1}) P_k
    over the distinct score thresholds, so tied scores enter as one step, with the precision of
    the whole tie group (no interpolation, no 11-point VOC rule).
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    targets = torch.as_tensor(targets).detach().to("cpu", torch.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, C)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0/1")
    n = scores.shape[0]
    s, order = torch.sort(scores, dim=0, descending=True, stable=True)  # (N, C)
    y = torch.gather(targets, 0, order)  # (N, C)
    tp = torch.cumsum(y, 0)  # (N, C) true positives at or above each rank
    precision = tp / torch.arange(1, n + 1, dtype=torch.float64)[:, None]  # (N, C)
    # a threshold sits at the last item of each run of tied scores: rank i's precision is that of
    # the end of its tie group, found by a reversed running minimum over group-end indices
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:-1] = s[:-1] != s[1:]
    end_idx = torch.where(is_end, torch.arange(n)[:, None], torch.full_like(s, n, dtype=torch.long))
    end_idx = torch.flip(torch.cummin(torch.flip(end_idx, [0]), 0).values, [0])  # (N, C)
    group_precision = torch.gather(precision, 0, end_idx)  # (N, C)
    positives = y.sum(0)  # (C,)
    ap = (y * group_precision).sum(0) / positives  # (C,) each positive adds 1/P of recall
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def lt_map(ap, train_class_freq):
    """mAP in percent over all classes and the head / medium / tail groups of the train counts.

    Classes with NaN AP (no positive test image) are left out of every mean and counted in n_nan;
    a group with no class left is NaN.
    """
    ap = torch.as_tensor(ap, dtype=torch.float64).cpu()
    freq = np.asarray(train_class_freq)
    if ap.ndim != 1 or freq.shape != (ap.shape[0],):
        raise ValueError(f"ap {tuple(ap.shape)} and train_class_freq {freq.shape} must both be (C,)")
    valid = ~torch.isnan(ap)
    groups = np.array([class_group(int(n)) for n in freq])

    def mean(mask):
        m = valid & torch.from_numpy(mask)
        return float(ap[m].mean() * 100) if m.any() else float("nan")

    out = {"total": mean(np.ones(len(freq), bool))}
    for g in ("head", "medium", "tail"):
        out[g] = mean(groups == g)
    out["n_nan"] = int((~valid).sum())
    return out

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
    try:  # build_ext --inplace puts it beside this file, which is on sys.path when capnet imports
        import capnet_ext
        return capnet_ext, ""
    except ModuleNotFoundError:
        return None, "not built"
    except (ImportError, OSError) as e:  # e.g. built against another torch
        return None, f"import failed: {e}"


capnet_ext, _EXT_WHY_NOT = _load_extension()
EXT_AVAILABLE = capnet_ext is not None
EXT_CUDA = EXT_AVAILABLE and bool(getattr(capnet_ext, "WITH_CUDA", False))
if not EXT_AVAILABLE:
    print(f"capnet: fused-op extension capnet_ext {_EXT_WHY_NOT}; using the pure-torch path "
          f"(build it with: python setup.py build_ext --inplace)", file=sys.stderr)


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
    # the kernel differentiates w.r.t. logits only: a trainable class_weight takes the reference
    if (class_weight is not None and class_weight.requires_grad) or not _use_ext(backend, logits.device, "db_focal_loss"):
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


# Autograd of these ops and of capnet::quick_gelu (QuickGELU) is registered in C++ (csrc/capnet_ops.cpp;
# a Python register_autograd round trip cost as much as the fused loss itself); the fake (meta) kernels
# that let torch.compile and torch.library.opcheck trace them are registered here, the same way for all.
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

    @torch.library.register_fake("capnet::quick_gelu")  # no autocast rule: bf16 in, bf16 out
    def _quick_gelu_fake(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("capnet::quick_gelu_backward")
    def _quick_gelu_backward_fake(grad, x):
        return x.new_empty(x.shape)

    # under autocast the kernels' inner ATen GEMMs would be autocast again and return bf16 (then
    # the next GCN layer fails its dtype check): the ops take float32 inputs and run outside it
    for _op in ("capnet::db_focal_loss", "capnet::graph_propagate"):
        for _device in ("cpu", "cuda"):
            torch.library.register_autocast(_op, _device, torch.float32)


# -----------------------------------------------------------------------------
# train

# The train loop owns the run folder runs/<name>/: config.json, log.txt, checkpoint.pt (atomic),
# results.json, per_class_ap.csv and ap_vs_freq.png. Everything that decides a number is a pure
# function of (config, seed, epoch, index), so a killed run resumed from its checkpoint reaches the
# same final numbers as one that never stopped (SPEC section 8).

# what a user runs to prepare each known dataset (printed when data/<name>/dataset.json is missing)
DATA_PREP_COMMANDS = {
    "synthetic-lt": "python data_prep.py synthetic-lt",
    "voc-lt": "python data_prep.py voc-lt --voc-root DIR --split img_id.txt",
    "coco-lt": "python data_prep.py coco-lt --coco-root DIR --split img_id.pkl",
    "nus-wide-lt": "python data_prep.py nus-wide-lt --nus-root DIR",
}
CHOICES = {
    "graph": GRAPH_MODES, "loss": LOSSES, "ctx": ("class", "shared"),
    "peft": ("adaptformer", "none", "full"), "sampler": ("uniform", "class-aware"), "tte": (1, 5, 10),
    "device": ("auto", "cpu", "cuda"), "amp": ("auto", "bf16", "none"), "backend": ("auto", "ext", "torch"),
}
# fields that may change between a run and its --resume without changing any number
RESUME_FREE = {"resume", "workers", "log_every", "device", "eval_batch_size", "compile", "seeds"}
# fields that name an ablation: a non-default value goes into the derived run name
ABLATION_FIELDS = ("graph", "loss", "peft", "tau_prime", "tte", "n_ctx", "s", "p", "ctx_init", "ctx", "sampler",
                   "scale_min")
CHECKPOINT_FORMAT = "capnet-checkpoint-1"


class RunError(RuntimeError):
    """A user-facing failure whose message says what to do (printed without a traceback)."""


def preset_config(data: str, method: str = "capnet") -> Config:
    # an unknown name is a custom dataset prepared with `data_prep.py lists`: a real dataset
    return Config(**{**PRESETS.get(data, dict(clip="ViT-B/16")), **METHODS[method]}, data=data)


def run_name(cfg: Config) -> str:
    base = preset_config(cfg.data)
    parts = [cfg.data] + (["epochs-0"] if cfg.epochs == 0 else [])  # evaluate only (--method zero-shot)
    clip = cfg.clip
    if clip and clip != base.clip and Path(clip).name != "clip.pt":
        parts.append((Path(clip).stem if clip not in KNOWN_MODELS else clip).replace("/", "-").replace("@", "-"))
    for key in ABLATION_FIELDS:
        value = getattr(cfg, key)
        if value != getattr(base, key):
            parts.append(f"{key.replace('_', '-')}-{value if value != '' else 'none'}".replace(" ", "_"))
    return "-".join(parts)


def resolve_config(cfg: Config) -> Config:
    """Check every choice and fill the "" defaults that depend on other fields."""
    cfg = dataclasses.replace(cfg)
    flag = lambda key: "--" + key.replace("_", "-")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{flag(key)} {getattr(cfg, key)!r}: expected one of {', '.join(map(str, allowed))}")
    for keys, least, rule in ((("batch_size", "eval_batch_size", "input_size", "n_ctx"), 1, "be at least 1"),
                              (("epochs", "workers", "adapter_dim", "ckpt_every", "seed", "log_every"), 0, "not be negative")):
        for key in keys:
            if getattr(cfg, key) < least:
                raise ValueError(f"{flag(key)} must {rule}, got {getattr(cfg, key)}")
    if not (0.0 <= cfg.p <= 1.0):
        raise ValueError(f"--p must lie in [0, 1], got {cfg.p}")
    if not (0.0 < cfg.scale_min <= 1.0):
        raise ValueError(f"--scale-min must lie in (0, 1], got {cfg.scale_min}")
    if not cfg.tau_prime > 0:
        raise ValueError(f"--tau-prime must be positive (inf turns re-weighting off), got {cfg.tau_prime}")
    if cfg.backend == "ext" and not EXT_AVAILABLE:
        raise ValueError("--backend ext: the capnet_ext extension is not built "
                         "(python setup.py build_ext --inplace)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if cfg.seeds:
        try:
            [int(s) for s in cfg.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds {cfg.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not cfg.clip:
        cfg.clip = str(Path(cfg.data_root) / cfg.data / "clip.pt") if cfg.data == "synthetic-lt" else "ViT-B/16"
    if not cfg.name:
        cfg.name = run_name(cfg)
    return cfg


def to_jsonable(x):
    # JSON has no inf/nan: inf (e.g. --tau-prime inf) is written as the string "inf", nan as null
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.generic) or (isinstance(x, torch.Tensor) and x.numel() == 1):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_atomic(path: Path, text_or_payload):
    """Temporary file, fsync, rename: a crash at any moment leaves the previous file intact.
    A str is written as text, anything else with torch.save (checkpoints)."""
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
    lines, line = [], ""
    for item in (f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()):
        item = item.ljust(24 * math.ceil((len(item) + 2) / 24))  # 24-character columns
        if line and len(line) + len(item) > 100:
            lines.append(line.rstrip())
            line = ""
        line += item
    return "\n".join("  " + l for l in lines + [line.rstrip()])


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_map(m: dict) -> str:
    f = lambda v: "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"
    return " | ".join(f"{g} {f(m[g])}" for g in GROUPS)


# ---- distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nothing else changes

def setup_device_and_dist(cfg: Config):
    """-> (device, rank, world). Under torchrun: gloo on CPU, nccl on GPU, one GPU per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return device, rank, world


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def sampler_weights(targets, class_freq, power: float = 1.0):
    # Class-aware re-sampling: image i is drawn with probability proportional to sum_c y_ic n_c^-q.
    # q = 1 is the per-image marginal of Shen et al.'s class-aware sampling (a class uniformly, then
    # one of its images), the re-sampling of Wu et al. 2020; q < 1 softens it. Unlabelled images: 0.
    inv = np.maximum(np.asarray(class_freq, dtype=np.float64), 1) ** -power  # (C,) n_c^-q
    w = np.asarray(targets, dtype=np.float64) @ inv  # (N,)
    return w / w.sum()


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  weights=None):
    # The global batches of one epoch (drop_last), each cut to this process's shard. The order
    # depends only on (seed, epoch), so a resumed run and every DDP process see the same batches;
    # batch_size is the global batch (2 processes x 32 = 1 process x 64). The extra words keep
    # this stream apart from the dataset's augmentation RNG [seed, epoch, index]. With `weights`
    # (class-aware sampler) an epoch is num_items draws with replacement: as many steps as uniform.
    rng = np.random.default_rng([seed, epoch, 2**32 - 1, 1])
    order = rng.permutation(num_items) if weights is None else rng.choice(num_items, num_items, p=weights)
    steps = num_items // batch_size
    return [order[i * batch_size:(i + 1) * batch_size][rank::world].tolist() for i in range(steps)]


# ---- data and backbone

def load_dataset(cfg: Config, rank: int = 0, world: int = 1, prepare: bool = True) -> "Prepared":
    path = Path(cfg.data_root) / cfg.data / "dataset.json"
    if not path.exists() and cfg.data == "synthetic-lt" and prepare:
        # the embedded default is made on first use (deterministic, a few minutes on 2 CPU cores).
        # data_prep.py runs as its own process, not an import: it imports this file, and an
        # import back would make a circle (and a second copy of this module under __main__)
        if rank == 0:
            command = [sys.executable, str(Path(__file__).resolve().parent / "data_prep.py"),
                       "synthetic-lt", "--root", cfg.data_root]
            print(f"{path} not found: preparing synthetic-lt ({' '.join(command[1:])})", flush=True)
            if subprocess.run(command).returncode != 0:
                raise RunError("preparing synthetic-lt failed (its error is printed above)")
        barrier(world)
    if not path.exists():
        command = DATA_PREP_COMMANDS.get(
            cfg.data, f"python data_prep.py lists --train F --test F --classes F --image-root DIR --name {cfg.data}")
        raise RunError(f"dataset {cfg.data!r} is not prepared: {path} does not exist.\n"
                       f"Prepare it with:\n  {command}\n(see README.md, 'Reproduce').")
    return load_prepared(path)


def make_test_set(prepared, cfg: Config):
    return MultiLabelDataset(prepared.test, prepared.image_root, len(prepared.classes), cfg.input_size,
                             mode="eval", n_views=cfg.tte, seed=cfg.seed, skip_bad=cfg.skip_bad_images)


def make_loader(dataset, cfg: Config, **kwargs):
    # no worker_init_fn: nothing draws from numpy's or Python's global RNG in a worker (every crop
    # comes from its own generator keyed by seed, epoch and index), so their copies do not matter
    return torch.utils.data.DataLoader(dataset, num_workers=cfg.workers,
                                       collate_fn=collate_skip_bad if cfg.skip_bad_images else None, **kwargs)


def load_backbone(cfg: Config):
    """The frozen CLIP named by cfg.clip. A real dataset never falls back to a toy model."""
    if cfg.clip not in KNOWN_MODELS and not Path(cfg.clip).exists():
        raise RunError(f"CLIP weights {cfg.clip!r} not found: pass a known model name "
                       f"({', '.join(KNOWN_MODELS)}) or the path of a checkpoint file.")
    try:
        return load_clip(cfg.clip, device="cpu")
    except RuntimeError as e:  # offline without the file, truncated or foreign file: the message says which
        raise RunError(str(e)) from None


def build_model(clip, classes, cfg: Config, train_targets, device):
    # the seed fixes every random init (prompts, adapters): a rebuilt model starts where training did
    torch.manual_seed(cfg.seed)
    model = CAPNet(clip, classes, cfg, train_targets).to(device)
    if use_bf16(cfg, device):  # after the label graph, which is computed in fp32
        hold_frozen_in_bf16(model.clip)
    return model


def hold_frozen_in_bf16(clip):
    """Under bf16 autocast, hold the frozen GEMM weights in bf16 once instead of having autocast
    cast them on every call (it caches casts only of weights that require grad). These are
    exactly the tensors autocast would round to bf16 (Linear, the attention in-projection, the
    ResNet convs after the stem, the two output projections), so outputs are unchanged; norms,
    embeddings, the stem conv (clip.dtype) and every trainable parameter stay fp32."""
    convs = [m for m in clip.visual.modules() if isinstance(m, nn.Conv2d) and m is not clip.visual.conv1]
    modules = [m for m in clip.modules() if isinstance(m, (nn.Linear, MultiheadAttention))] + convs
    params = [p for m in modules for p in m.parameters(recurse=False)] + [clip.text_projection]
    params += [clip.visual.proj] if isinstance(clip.visual, VisionTransformer) else []
    for p in params:
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


# ---- checkpoints: trainable parameters + optimizer + scheduler + RNG, written atomically

def check_checkpoint(ckpt: dict, data: str, classes: list, clip_source: dict, where: str):
    """A checkpoint only fits the dataset, class list and backbone it was trained with."""
    if ckpt["config"]["data"] != data:
        raise RunError(f"{where}: checkpoint was trained on dataset {ckpt['config']['data']!r}, not {data!r}")
    old, new = list(ckpt["classes"]), list(classes)
    if old != new:
        diff = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(old, new)) if a != b][:3]
        raise RunError(f"{where}: class list differs from the checkpoint's ({len(old)} classes in the "
                       f"checkpoint, {len(new)} now; {'; '.join(diff) or 'one list extends the other'})")
    was = ckpt["clip"]
    if was.get("sha256") != clip_source.get("sha256"):
        raise RunError(f"{where}: backbone differs: checkpoint was trained with CLIP {was.get('name')!r} "
                       f"(sha256 {str(was.get('sha256'))[:12]}), now {clip_source.get('name')!r} "
                       f"(sha256 {str(clip_source.get('sha256'))[:12]})")


def rng_state() -> dict:
    # torch's RNG seeds the DataLoader workers; numpy's global RNG is never drawn from (crops and
    # batch order come from their own generators, keyed by seed, epoch and index)
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, unpickling refused ...
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
        reason = next((l for l in lines if "error:" in l.lower()), lines[0])
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
    with torch.no_grad():
        for n in expected:
            if params[n].shape != state[n].shape:
                raise RunError(f"checkpoint parameter {n} has shape {tuple(state[n].shape)}, "
                               f"the model {tuple(params[n].shape)}")
            params[n].copy_(state[n])


# ---- schedule: linear warm-up, then cosine to zero (SPEC section 6)

def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int):
    # Deviation (ours): the temperature t trains at lr * temperature_lr_scale. At the full lr the
    # first steps of the DB-focal loss, where every logit starts positive (cosines ~0.25), drive t
    # towards 0 and flatten all logits (measured on synthetic-lt: exp(t) 14 -> 0.08, mAP falls
    # 10+ points); at 1/100 of the lr t still adapts (14.0 -> 13.2) and mAP does not collapse.
    # --peft full: CLIP's own weights train at lr * clip_lr_scale (ours), prompts and GCN at the full lr
    trainable = [p for p in model.parameters() if p.requires_grad]
    no_decay = {id(p) for p in model.no_decay_parameters()}  # temperature, adapter scales
    clip_ids = {id(p) for p in model.clip.parameters()} if cfg.peft == "full" else set()
    t = model.logit_scale
    # --prompt-weight-decay (ours, synthetic-lt preset): the context vectors decay at their own rate
    ctx = {id(model.prompt_learner.ctx)} if cfg.prompt_weight_decay >= 0 else set()
    decay = [p for p in trainable if id(p) not in no_decay | clip_ids | ctx]  # prompts, GCN, adapters
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if id(p) in no_decay and p is not t], "weight_decay": 0.0},
              {"params": [t], "weight_decay": 0.0, "lr": cfg.lr * cfg.temperature_lr_scale}]
    if ctx:
        groups.append({"params": [model.prompt_learner.ctx], "weight_decay": cfg.prompt_weight_decay})
    if clip_ids:
        groups.append({"params": [p for p in trainable if id(p) in clip_ids], "weight_decay": cfg.weight_decay,
                       "lr": cfg.lr * cfg.clip_lr_scale})
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch))) if cfg.warmup_epochs > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    return optimizer, scheduler


# ---- scoring a test set (shared by zero-shot, final eval and `eval`)

def autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    # master weights, loss and metrics stay fp32; only the forward runs in bf16
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def view_logits(forward, images: torch.Tensor) -> torch.Tensor:
    """images (B, V, 3, S, S) -> logits averaged over the V test-time views (SPEC 1 step 8)."""
    B, V = images.shape[:2]
    logits = forward(images.flatten(0, 1)).float()  # (B * V, C)
    return logits.view(B, V, -1).mean(1)  # (B, C)


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
    """Plain CLIP with "a photo of a {name}." (no prompts, no GCN, no PEFT): the baseline."""
    text = zero_shot_text_features(clip, classes).float()  # (C, D), normalised
    scale = clip.logit_scale.exp().float()

    def forward(images):
        v = F.normalize(clip.encode_image(images).float(), dim=-1)  # (B, D)
        return scale * v @ text.t()  # (B, C)
    return forward


def summarize(ap: torch.Tensor, counts) -> dict:
    return {k: float(v) for k, v in lt_map(ap, counts).items()}


# ---- the plot: per-class AP against training frequency (Pillow only)

def plot_ap_vs_freq(per_class: list, path: Path, title: str):
    """Per-class AP (y, %) against training images (x, log scale) on the tail / medium / head
    bands: zero-shot (grey ring) joined to trained (orange dot)."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, left, right, top, bottom = 960, 600, 90, 30, 60, 80
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=14)
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
    for xy, text in (((left + 200, H - 30), "training images per class (log scale)"), ((W / 2, 25), title),
                     ((45, top - 20), "AP (%)")):
        d.text(xy, text, fill="black", font=font, anchor="mm")
    for x, text, style in ((W - 330, "zero-shot CLIP", dict(outline=(120, 120, 120), width=2)),
                           (W - 170, "CAPNet (trained)", dict(fill=(220, 90, 20)))):  # the legend
        d.ellipse([x, H - 35, x + 10, H - 25], **style)
        d.text((x + 16, H - 30), text, fill="black", font=small, anchor="lm")
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


# ---- the run

def train(cfg: Config) -> dict:
    """Train CAPNet per cfg (or once per seed with --seeds) -> results dict (also runs/<name>/results.json)."""
    cfg = resolve_config(cfg)
    if cfg.seeds:
        return train_seeds(cfg)
    start = time.time()
    device, rank, world = setup_device_and_dist(cfg)
    if cfg.batch_size % world:
        raise RunError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by {world} processes")
    run_dir = Path(cfg.out_dir) / cfg.name
    ckpt_path = run_dir / "checkpoint.pt"
    if not cfg.resume and (ckpt_path.exists() or (run_dir / "results.json").exists()):
        raise RunError(f"{run_dir} already holds a run: pass --resume to continue it, "
                       f"or --name NAME to start a new one")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str = ""):  # print, and append to log.txt; other ranks stay quiet
        if rank == 0:
            print(msg, flush=True)
            with open(run_dir / "log.txt", "a") as f:
                f.write(msg + "\n")
    amp = use_bf16(cfg, device)

    prepared = load_dataset(cfg, rank, world)
    classes, C = prepared.classes, len(prepared.classes)
    counts = class_counts(prepared.train, C)  # (C,) from train only
    train_targets = multihot(prepared.train, C)  # (N, C)
    clip = load_backbone(cfg).to(device)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint(ckpt, cfg.data, classes, clip.source, f"--resume {run_dir}")
        changed = [k for k, v in ckpt["config"].items() if k not in RESUME_FREE and getattr(cfg, k) != v]
        if changed:
            raise RunError(f"--resume {run_dir}: config differs from the checkpoint's in "
                           + ", ".join(f"{k} ({ckpt['config'][k]!r} -> {getattr(cfg, k)!r})" for k in changed)
                           + "; start a new run with --name instead")

    log(f"CAPNet train: {run_dir} ({'resuming at step %d' % ckpt['step'] if ckpt else 'new run'}), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    if rank == 0:
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    log("config:\n" + format_config(cfg) + f"\ndataset {prepared.name}: {len(prepared.train)} train / "
        f"{len(prepared.test)} test images\n" + format_class_stats(classes, counts))
    backend = cfg.backend if cfg.backend != "auto" else ("ext" if EXT_AVAILABLE else "torch")
    log(f"fused ops: {'capnet_ext extension' if backend == 'ext' else 'pure torch reference'}"
        + ("" if EXT_AVAILABLE else " (extension not built: python setup.py build_ext --inplace)"))
    log(f"device {device}, {'bf16 autocast' if amp else 'fp32'}, {world} process(es)"
        + (f", DDP {'nccl' if device.type == 'cuda' else 'gloo'}" if world > 1 else ""))
    log(f"CLIP {clip.source['name']} (sha256 {clip.source['sha256'][:12]}), embed dim {clip.embed_dim}, "
        f"input {cfg.input_size}")

    test_set = make_test_set(prepared, cfg)
    if ckpt is not None:
        ap_zero_shot = ckpt["zero_shot_ap"]
    else:  # step 0: plain CLIP, same TTE, before any training
        t0 = time.time()
        scores, targets = score_dataset(zero_shot_forward(clip, classes), test_set, cfg, device, amp, rank, world)
        ap_zero_shot = average_precision(scores, targets)
        log(f"zero-shot mAP (step 0, tte {cfg.tte}): " + format_map(summarize(ap_zero_shot, counts))
            + f"  [{time.time() - t0:.1f}s]")

    model = build_model(clip, classes, cfg, train_targets, device)
    log(graph_stats(model.gcn.P, classes, counts) + "\ntrainable parameters:\n" + model.trainable_summary())

    train_set = MultiLabelDataset(prepared.train, prepared.image_root, C, cfg.input_size, mode="train",
                                  scale_min=cfg.scale_min, seed=cfg.seed, skip_bad=cfg.skip_bad_images)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    weights = sampler_weights(train_targets, counts, cfg.sampler_power) if cfg.sampler == "class-aware" else None
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    criterion = make_criterion(cfg, counts, len(prepared.train))
    step, wall_before = 0, 0.0
    if ckpt is not None:
        load_trainable(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        step, wall_before = ckpt["step"], ckpt["wall_seconds"]
    forward = model
    if world > 1:
        # --peft full: CLIP's token table and its own logit scale are trainable but get no gradient
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      find_unused_parameters=cfg.peft == "full")
    if cfg.compile:
        forward = torch.compile(forward)

    def checkpoint(step: int):
        if rank == 0:
            write_atomic(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "optimizer": optimizer.state_dict(),
                "model": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                "holds": "the full model (--peft full)" if cfg.peft == "full" else "the trainable parameters",
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(),
                "config": dataclasses.asdict(cfg), "classes": list(classes), "clip": dict(clip.source),
                "class_counts": torch.as_tensor(counts, dtype=torch.int64),
                "train_targets": torch.as_tensor(train_targets).bool(), "zero_shot_ap": ap_zero_shot,
                "wall_seconds": wall_before + time.time() - start, "versions": versions()})
        barrier(world)

    log(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch {cfg.batch_size}, "
        f"SGD lr {cfg.lr} momentum {cfg.momentum} wd {cfg.weight_decay}"
        + (f" (prompts {cfg.prompt_weight_decay})" if cfg.prompt_weight_decay >= 0 else "") + f", cosine, warm-up {cfg.warmup_epochs} epoch(s)")
    model.train()
    t_window, s_window = time.time(), step
    while step < total_steps:
        epoch = step // steps_per_epoch
        train_set.set_epoch(epoch)
        batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, rank, world, weights)
        loader = make_loader(train_set, cfg, batch_sampler=batches[step - epoch * steps_per_epoch:],
                             pin_memory=device.type == "cuda")
        for batch in loader:
            if batch is None:  # --skip-bad-images dropped every image of this batch: stop clearly
                raise RunError(f"step {step}: no readable image in this training batch "
                               f"(--skip-bad-images); check the data set's images")
            images, targets, _ = batch
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = forward(images)  # (B, C)
            loss = criterion(logits.float(), targets.float())  # fp32 loss
            loss_value = loss.detach().clone()
            if world > 1:
                torch.distributed.all_reduce(loss_value)
                loss_value /= world
            if not torch.isfinite(loss_value):
                kept = (f"the last good checkpoint {ckpt_path} (step {load_checkpoint(ckpt_path)['step']}) is kept"
                        if ckpt_path.exists() else "no checkpoint was written yet")
                raise RunError(f"non-finite loss ({loss_value.item()}) at step {step + 1}; stopping, {kept}. "
                               f"Try a lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.clamp_temperature_()  # t <= ln(100) (SPEC 1 step 6)
            scheduler.step()
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == total_steps):
                rate = (step - s_window) / max(1e-9, time.time() - t_window)
                log(f"step {step}/{total_steps} | epoch {epoch + 1}/{cfg.epochs} | loss {loss_value.item():.4f} | "
                    f"lr {scheduler.get_last_lr()[0]:.2e} | {rate:.2f} steps/s | "
                    f"eta {format_duration((total_steps - step) / max(rate, 1e-9))}")
                t_window, s_window = time.time(), step
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step % steps_per_epoch:
                checkpoint(step)
        checkpoint(step)  # at least once per epoch

    model.eval()
    t0 = time.time()
    if total_steps == 0:  # --epochs 0 (--method zero-shot): evaluate only, "trained" is the step-0 zero-shot
        ap = ap_zero_shot
    else:
        ap = average_precision(*score_dataset(model, test_set, cfg, device, amp, rank, world))
    results = {"zero_shot": summarize(ap_zero_shot, counts), "trained": summarize(ap, counts),
               "per_class": per_class_rows(classes, counts, ap_zero_shot, ap), "config": dataclasses.asdict(cfg),
               "seed": cfg.seed, "versions": versions(), "steps": total_steps, "world_size": world,
               "backend": backend, "dataset": {"name": prepared.name, "train_images": len(prepared.train),
                                               "test_images": len(prepared.test), "source": prepared.source},
               "clip": dict(clip.source), "wall_seconds": wall_before + time.time() - start}
    log(f"trained mAP (tte {cfg.tte}):  " + format_map(results["trained"]) + f"  [{time.time() - t0:.1f}s]")
    log(f"zero-shot mAP (tte {cfg.tte}): " + format_map(results["zero_shot"]))
    if cfg.skip_bad_images:  # counted per read: a bad train image counts once per epoch in this process
        results["bad_images"] = {"train_reads": train_set.bad_count, "test": test_set.bad_count}
        log(f"skipped unreadable images: {train_set.bad_count} train reads, {test_set.bad_count} test images")
    if rank == 0:
        write_outputs(run_dir, results)
        log(f"wrote {run_dir}/: config.json log.txt checkpoint.pt results.json per_class_ap.csv ap_vs_freq.png "
            f"({format_duration(results['wall_seconds'])})")
    barrier(world)
    return results


def train_seeds(cfg: Config) -> dict:
    """--seeds 0,1,2: one run per seed under runs/<name>/seed<k>/, then mean and std (n - 1).
    A seed whose run finished before is read back (its config must match), a killed one resumes:
    a long table survives a crash and costs only what is missing."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    runs = []
    for s in seeds:
        one = dataclasses.replace(cfg, seed=s, seeds="", name=f"{cfg.name}/seed{s}")
        run_dir = Path(cfg.out_dir) / one.name
        if (run_dir / "results.json").exists():
            done = json.loads((run_dir / "results.json").read_text())
            default = to_jsonable(dataclasses.asdict(Config()))  # a field added since: its default held then
            changed = [k for k, v in to_jsonable(dataclasses.asdict(one)).items()
                       if k not in RESUME_FREE and done["config"].get(k, default[k]) != v]
            if changed:
                raise RunError(f"{run_dir} holds a finished run with another config ({', '.join(changed)}); "
                               f"pick another --name")
            print(f"{run_dir}: finished before, read from results.json", flush=True)
            runs.append(done)
        else:
            runs.append(train(dataclasses.replace(one, resume=(run_dir / "checkpoint.pt").exists())))
    summary = {"seeds": seeds, "runs": [f"{cfg.out_dir}/{cfg.name}/seed{s}" for s in seeds], **mean_std(runs)}
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(cfg.out_dir) / cfg.name / "seeds.json", summary)
        print(f"\n{len(seeds)} seeds ({cfg.seeds}): mean +- std mAP")
        for kind in ("zero_shot", "trained"):
            print(f"  {kind:9s} " + " | ".join(f"{g} {summary[kind][g]['mean']:.2f} +- {summary[kind][g]['std']:.2f}"
                                             for g in GROUPS))
    return summary


def mean_std(runs: list, kinds=("zero_shot", "trained")) -> dict:
    """{kind: {group: {"mean", "std" (n - 1), "values"}}} over the runs' results."""
    out = {}
    for kind in kinds:
        values = {g: np.array([r[kind][g] for r in runs], dtype=np.float64) for g in GROUPS}
        out[kind] = {g: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         "values": v.tolist()} for g, v in values.items()}
    return out


# ---- tables: every row of a table trained over --seeds (default 0,1,2), mean +- std per group

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


def latest_checkpoint(out_dir: str = "runs") -> Path:
    found = sorted(Path(out_dir).glob("**/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunError(f"no checkpoint under {out_dir}/: train first (python capnet.py train) or pass --ckpt")
    return found[-1]


def load_for_inference(ckpt_path, device: str = "auto", tte: int | None = None):
    """-> (model in eval mode, cfg, ckpt, device): CAPNet exactly as trained, rebuilt from the
    checkpoint's config, classes, counts and labels, with its trained parameters loaded."""
    ckpt = load_checkpoint(ckpt_path)
    unknown = sorted(set(ckpt["config"]) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise RunError(f"checkpoint config has fields this capnet.py does not know: {', '.join(unknown)}")
    cfg = Config(**ckpt["config"])
    cfg = resolve_config(dataclasses.replace(cfg, device=device, resume=False, tte=tte if tte is not None else cfg.tte))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    clip = load_backbone(cfg).to(dev)
    check_checkpoint(ckpt, cfg.data, ckpt["classes"], clip.source, f"checkpoint {ckpt_path}")
    model = build_model(clip, list(ckpt["classes"]), cfg, ckpt["train_targets"].float().numpy(), dev)
    load_trainable(model, ckpt["model"])
    return model.eval(), cfg, ckpt, dev


def evaluate(ckpt_path=None, tte: int | None = None, device: str = "auto", out_dir: str = "runs",
             workers: int | None = None, skip_bad: bool = False) -> dict:
    """`capnet.py eval`: model, preprocessing and class list from the checkpoint -> mAP dict (percent)."""
    ckpt_path = Path(ckpt_path) if ckpt_path else latest_checkpoint(out_dir)
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte)
    cfg = dataclasses.replace(cfg, workers=cfg.workers if workers is None else workers,
                              skip_bad_images=cfg.skip_bad_images or skip_bad)
    prepared = load_dataset(cfg, prepare=False)
    check_checkpoint(ckpt, cfg.data, prepared.classes, ckpt["clip"], f"checkpoint {ckpt_path} vs {cfg.data_root}/{cfg.data}")
    counts = ckpt["class_counts"].numpy()
    if not np.array_equal(counts, class_counts(prepared.train, len(prepared.classes))):
        raise RunError(f"checkpoint {ckpt_path}: the training set of {cfg.data_root}/{cfg.data} changed since "
                       f"training (class counts differ), so head/medium/tail would not match")
    test_set = make_test_set(prepared, cfg)
    t0 = time.time()
    result = summarize(average_precision(*score_dataset(model, test_set, cfg, dev, use_bf16(cfg, dev))), counts)
    print(f"{ckpt_path} (step {ckpt['step']}), {cfg.data} test ({len(test_set)} images, {test_set.bad_count} unreadable "
          f"skipped), tte {cfg.tte}: {time.time() - t0:.1f}s")
    print("mAP " + format_map(result))
    return {**result, "bad_images": {"test": test_set.bad_count}}


def image_files(paths) -> list:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:  # a file, or a missing one: predict reports it among the results
            files.append(p)
    if not files:
        raise RunError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    return files


@torch.no_grad()
def predict(ckpt_path, paths, threshold: float = 0.5, top_k: int = 5, tte: int | None = None,
            device: str = "auto", as_json: bool = False, batch_size: int = 16) -> list:
    """`capnet.py predict`: per image (batch by batch) the labels with probability >= threshold, or its error."""
    if not 0.0 <= threshold <= 1.0 or top_k < 1 or batch_size < 1:
        raise RunError(f"out of range: --threshold {threshold} (0..1), --top-k {top_k} or --batch-size {batch_size} (>= 1)")
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte)
    classes, amp, files = list(ckpt["classes"]), use_bf16(cfg, dev), image_files(paths)
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
    v = versions()
    print(f"python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, pillow {v['pillow']}, {v['platform']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)} (bf16 {torch.cuda.is_bf16_supported()})")
    else:
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads; no CUDA device)")
    print("fused ops: " + ("capnet_ext extension built (backend auto -> ext)" if EXT_AVAILABLE else
                           "extension not built, pure torch reference used (python setup.py build_ext --inplace)"))
    cache = clip_cache_dir()
    print(f"CLIP models (download cache {cache}):")
    for name, url in KNOWN_MODELS.items():
        path = cache / os.path.basename(url)
        print(f"  {name:16s} {'present' if path.exists() else 'absent '}  {path}")
    prepared = sorted(Path("data").glob("*/dataset.json"))
    print("prepared datasets: " + (", ".join(p.parent.name for p in prepared) if prepared else "none under data/"))


# -----------------------------------------------------------------------------
# CLI

def parse_bool(text: str) -> bool:
    import argparse
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args) -> Config:
    """Preset of --data, then of --method, then every flag given on the command line."""
    cfg = preset_config(args.data or Config.data, getattr(args, "method", None) or "capnet")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **given)


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="capnet.py", allow_abbrev=False,
                                     description="CAPNet: CLIP prompts + label-graph GCN for long-tailed multi-label recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", allow_abbrev=False, help="train (default: the embedded synthetic-lt)")
    p.add_argument("--method", choices=sorted(METHODS), help="a preset of flags (README: Methods and baselines)")
    # one strict --key value flag per Config field (underscores become dashes); bools also as bare flags
    kinds = {"int": int, "float": float, "str": str, "bool": parse_bool}
    for f in dataclasses.fields(Config):
        kind = kinds[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = "--" + f.name.replace("_", "-")
        if kind is parse_bool:
            p.add_argument(flag, type=kind, nargs="?", const=True, default=None, metavar="true|false")
        else:
            p.add_argument(flag, type=kind, default=None, metavar=f.type.upper() if kind is not str else "TEXT")
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
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness left this file: it imports capnet, never the reverse
        sys.exit("capnet.py bench moved to its own script: python bench.py [--quick] [--json FILE]")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(config_from_args(args))
        if args.command == "eval":
            return evaluate(args.ckpt, args.tte, args.device, args.out_dir, args.workers, args.skip_bad_images)
        if args.command == "table":
            return run_table(args.table, args.train_flags)
        if args.command == "predict":
            rows = predict(args.ckpt, args.images, args.threshold, args.top_k, args.tte, args.device, args.json, args.batch_size)
            return sys.exit(1) if any("error" in r for r in rows) else rows  # scripts notice an unreadable file
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

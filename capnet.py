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

# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    main()

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

# Class statistics are always taken from the train split (SPEC section 5). Group rule of the
# VOC-LT / COCO-LT papers: head n >= 100, medium 20 <= n < 100, tail n < 20.
HEAD_MIN = 100
TAIL_MIN = 20


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
            print(f"warning: skipping bad image {self.image_root / relpath}: {e}", file=sys.stderr)
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
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


def seed_worker(worker_id):
    # DataLoader seeds torch per worker; numpy and random follow it (our augmentation draws from
    # its own per-item generator, this only guards other users of the global RNGs)
    import random
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)

# -----------------------------------------------------------------------------
# label graph, GCN, prompt learner, CAPNet

# -----------------------------------------------------------------------------
# losses

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

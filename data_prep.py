"""
Data preparation for CAPNet: raw VOC / COCO / NUS-WIDE releases and list files to the
prepared format `data/<name>/dataset.json` (read by capnet.load_prepared), and the embedded synthetic
long-tailed world with its small pretrained CLIP.

    python data_prep.py synthetic-lt
    python data_prep.py voc-lt --voc-root DIR --split img_id.txt
    python data_prep.py coco-lt --coco-root DIR --split img_id.pkl
    python data_prep.py nus-wide-lt --nus-root DIR
    python data_prep.py lists --train F --test F --classes F --image-root DIR --name NAME
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# common: writing dataset.json, class statistics

import capnet  # noqa: E402  the one definition of class statistics and of the prepared-format checks

VERIFY_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises for missing / truncated / non-images


def read_lines(path, what="file"):
    """Non-empty stripped lines of a text file; a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_image(path):
    """Reason an image cannot be used ('' when it is fine): missing, not an image, truncated."""
    from PIL import Image
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()  # header and structure; cheap, no full decode
        return ""
    except VERIFY_ERRORS as e:
        return f"unreadable ({type(e).__name__}: {e})"


def verify_images(image_root, items, skip_bad=False, split="train"):
    """Keep the items whose image exists and reads; otherwise fail naming the file.

    skip_bad drops (and counts) bad images instead. Returns (kept items, number dropped).
    """
    kept, n_bad = [], 0
    for relpath, labels in items:
        path = Path(image_root) / relpath
        reason = check_image(path)
        if not reason:
            kept.append((relpath, labels))
        elif skip_bad:
            n_bad += 1
            print(f"warning: skipping {split} image {path}: {reason}", file=sys.stderr)
        else:
            raise ValueError(f"{split} image {path} is {reason} (--skip-bad-images drops and counts such images)")
    return kept, n_bad


def write_dataset(out_root, name, classes, image_root, train, test, source):
    """Write <out_root>/<name>/dataset.json (atomically, after validating it) and print statistics."""
    out_dir = Path(out_root) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = lambda items: [[rel, sorted({int(i) for i in labels})] for rel, labels in items]
    # images inside the data folder (synthetic-lt) are stored relative to the json, so the folder
    # can move; raw releases elsewhere keep their absolute path
    root = Path(image_root).resolve()
    if root.is_relative_to(out_dir.resolve()):
        root = root.relative_to(out_dir.resolve())
    d = {"name": name, "classes": list(classes), "image_root": str(root),
         "train": norm(train), "test": norm(test), "source": source}
    path = out_dir / "dataset.json"
    tmp = out_dir / "dataset.json.tmp"
    tmp.write_text(json.dumps(d))
    try:
        prepared = capnet.load_prepared(tmp)  # same checks as training will apply: fail now, not later
    except Exception:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    counts = capnet.class_counts(prepared.train, len(classes))
    print(f"wrote {path}")
    print(f"train: {len(prepared.train)} images, test: {len(prepared.test)} images")
    print(capnet.format_class_stats(prepared.classes, counts, num_images=len(prepared.train)))
    return path


def items_from_matrix(relpaths, labels):
    """(relpaths, (N, C) 0/1 matrix) -> [(relpath, [label indices])]."""
    return [(r, np.flatnonzero(row).tolist()) for r, row in zip(relpaths, labels)]

# -----------------------------------------------------------------------------
# VOC-LT, COCO-LT, NUS-WIDE-LT, lists

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]

# long-tail targets when no official split is given (--make-split): the head and tail sizes of the
# official VOC-LT (775 .. 4) and COCO-LT (1128 .. 6), and the Pareto shape alpha (pareto_targets)
# that fits each official count profile best in log space (VOC-LT 0.2: mean |log ratio| 0.07,
# COCO-LT 0.3: 0.18). NUS-WIDE-LT has no official split here: ours takes COCO-LT's profile.
LT_DEFAULTS = {"voc-lt": dict(n_max=775, n_min=4, alpha=0.2), "coco-lt": dict(n_max=1128, n_min=6, alpha=0.3),
               "nus-wide-lt": dict(n_max=1128, n_min=6, alpha=0.3)}

NOT_OFFICIAL = ("*** WARNING: --make-split draws OUR OWN long-tailed subset (seed {seed}); it is NOT the "
                "official {name} split and its numbers are not comparable with published ones. "
                "Pass --split with the official file for benchmark results. ***")


def voc_labels(xml_path):
    """Sorted class indices of one VOC annotation XML; difficult objects count (VOC-LT does so)."""
    import xml.etree.ElementTree as ET
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"VOC annotation {xml_path} is not valid XML ({e})") from None
    labels = set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"VOC annotation {xml_path} has an unknown class {name!r}")
        labels.add(VOC_CLASSES.index(name))
    return sorted(labels)


def _voc_devkit(voc_root):
    root = Path(voc_root)
    if (root / "VOCdevkit").is_dir():
        root = root / "VOCdevkit"  # accept the folder above VOCdevkit too
    for year in ("VOC2012", "VOC2007"):
        if not (root / year).is_dir():
            raise FileNotFoundError(f"{root / year} not found: --voc-root must hold VOCdevkit/VOC2012 (trainval) "
                                    f"and VOCdevkit/VOC2007 (test)")
    return root


def _voc_items(devkit, year, ids):
    return [(f"{year}/JPEGImages/{i}.jpg", voc_labels(devkit / year / "Annotations" / f"{i}.xml")) for i in ids]


def _split_ids(split, what):
    ids = [line.split()[0] for line in read_lines(split, f"{what} split file")]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise ValueError(f"split file {split} lists image id {dup[0]!r} more than once")
    return ids


def prepare_voc_lt(voc_root, split=None, out_root="data", make_split=False, seed=0, skip_bad=False,
                   name="voc-lt", alpha=None):
    """VOC-LT: train = the listed VOC2012 trainval ids, test = VOC2007 test; labels from the XMLs."""
    if bool(split) == bool(make_split):
        raise ValueError("give exactly one of --split (the official VOC-LT img_id.txt) or --make-split")
    devkit = _voc_devkit(voc_root)
    if split:
        train = _voc_items(devkit, "VOC2012", _split_ids(split, "VOC-LT"))
        source = {"split": str(Path(split).resolve()), "official": True}
    else:
        pool_ids = read_lines(devkit / "VOC2012/ImageSets/Main/trainval.txt", "VOC2012 trainval list")
        pool = _voc_items(devkit, "VOC2012", pool_ids)
        train, source = _make_split_items(pool, len(VOC_CLASSES), "voc-lt", seed, alpha)
    test_ids = read_lines(devkit / "VOC2007/ImageSets/Main/test.txt", "VOC2007 test list")
    test = _voc_items(devkit, "VOC2007", test_ids)
    source.update(dataset="PASCAL VOC (train: VOC2012 trainval subset, test: VOC2007 test)",
                  voc_root=str(devkit.resolve()), labels="XML objects, difficult included")
    return _finish(out_root, name, VOC_CLASSES, devkit, train, test, source, skip_bad)


def coco_labels(instances_json):
    """(class names in ascending category id, [(image id, file name, sorted labels)] in file order)."""
    path = Path(instances_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    d = json.loads(path.read_text())
    cats = sorted(d["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    labels = {im["id"]: set() for im in d["images"]}
    for a in d["annotations"]:  # crowd annotations count too: the object is in the image
        if a["image_id"] not in labels:
            raise ValueError(f"{path}: annotation {a.get('id')} refers to unknown image {a['image_id']}")
        if a["category_id"] not in index:
            raise ValueError(f"{path}: annotation {a.get('id')} has unknown category {a['category_id']}")
        labels[a["image_id"]].add(index[a["category_id"]])
    images = [(im["id"], im["file_name"], sorted(labels[im["id"]])) for im in d["images"]]
    return [c["name"] for c in cats], images


def read_id_file(path):
    """COCO-LT image ids: plain text one per line (the official img_id.pkl is text despite its name),
    or a real pickle of a list of ids."""
    import pickle
    raw = Path(path).read_bytes() if Path(path).is_file() else None
    if raw is None:
        raise FileNotFoundError(f"COCO-LT split file not found: {path}")
    try:
        tokens = raw.decode("ascii").split()
    except UnicodeDecodeError:
        tokens = [str(i) for i in pickle.loads(raw)]
    try:
        ids = [int(t) for t in tokens]
    except ValueError as e:
        raise ValueError(f"split file {path}: not a list of integer image ids ({e})") from None
    if len(set(ids)) != len(ids):
        raise ValueError(f"split file {path} lists an image id more than once")
    return ids


def prepare_coco_lt(coco_root, split=None, out_root="data", make_split=False, seed=0, skip_bad=False,
                    name="coco-lt", alpha=None):
    """COCO-LT: train = listed train2017 ids, test = all of val2017 (unlabelled images kept)."""
    if bool(split) == bool(make_split):
        raise ValueError("give exactly one of --split (the official COCO-LT img_id.pkl) or --make-split")
    root = Path(coco_root)
    classes, train_images = coco_labels(root / "annotations/instances_train2017.json")
    val_classes, val_images = coco_labels(root / "annotations/instances_val2017.json")
    if val_classes != classes:
        raise ValueError("instances_train2017.json and instances_val2017.json have different categories")
    by_id = {i: (f"train2017/{f}", labels) for i, f, labels in train_images}
    if split:
        ids = read_id_file(split)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"split file {split}: image id {missing[0]} is not in instances_train2017.json "
                             f"({len(missing)} missing)")
        train = [by_id[i] for i in ids]
        source = {"split": str(Path(split).resolve()), "official": True}
    else:
        pool = [by_id[i] for i, _, labels in train_images if labels]
        train, source = _make_split_items(pool, len(classes), "coco-lt", seed, alpha)
    test = [(f"val2017/{f}", labels) for _, f, labels in val_images]
    source.update(dataset="MS COCO 2017 (train: train2017 subset, test: val2017)", coco_root=str(root.resolve()),
                  labels="instances annotations, classes in ascending category id")
    return _finish(out_root, name, classes, root, train, test, source, skip_bad)


def _nus_relpath(line):
    # official lists write Windows paths, "actor\0001_2124494179.jpg" (or with a C:\...\Flickr\ prefix)
    rel = line.split()[0].replace("\\", "/")
    return rel.split("Flickr/", 1)[1] if "Flickr/" in rel else rel


def _nus_split(nus_root, concepts, part):
    relpaths = [_nus_relpath(l) for l in read_lines(nus_root / f"ImageList/{part}Imagelist.txt",
                                                     f"NUS-WIDE {part.lower()} image list")]
    y = np.zeros((len(relpaths), len(concepts)), np.uint8)  # (N, C)
    for c, concept in enumerate(concepts):
        f = nus_root / f"Groundtruth/TrainTestLabels/Labels_{concept}_{part}.txt"
        col = read_lines(f, "NUS-WIDE label file")
        if len(col) != len(relpaths) or set(col) - {"0", "1"}:
            raise ValueError(f"{f}: expected {len(relpaths)} lines of 0/1 (one per image of "
                             f"{part}Imagelist.txt), got {len(col)} lines")
        y[:, c] = np.array(col) == "1"
    return relpaths, y


def prepare_nus_wide_lt(nus_root, image_root=None, out_root="data", seed=0, skip_bad=False,
                        name="nus-wide-lt", alpha=None):
    """NUS-WIDE-LT: 81 concepts; a seeded long-tailed train subset (make_split) of the official train
    list; the official test list. Missing images (many Flickr photos are gone) are skipped and counted."""
    nus_root = Path(nus_root)
    concepts = read_lines(nus_root / "Concepts81.txt", "NUS-WIDE concept list")
    image_root = Path(image_root) if image_root else nus_root / "Flickr"
    counts = {}
    items = {}
    for part in ("Train", "Test"):
        relpaths, y = _nus_split(nus_root, concepts, part)
        present = [(image_root / r).is_file() for r in relpaths]
        counts[f"missing_{part.lower()}"] = len(relpaths) - sum(present)
        items[part] = [it for it, ok in zip(items_from_matrix(relpaths, y), present) if ok]
    print(f"NUS-WIDE: skipped {counts['missing_train']} missing train and {counts['missing_test']} missing test "
          f"images (not under {image_root})")
    pool = [it for it in items["Train"] if it[1]]  # images with no concept cannot serve any class
    train, source = _make_split_items(pool, len(concepts), "nus-wide-lt", seed, alpha, warn=False)
    source.update(counts, dataset="NUS-WIDE (train: long-tailed subset of the official train list, "
                  "test: official test list, unlabelled images kept)", nus_root=str(nus_root.resolve()))
    return _finish(out_root, name, concepts, image_root, train, items["Test"], source, skip_bad)


def read_classes(path):
    """Class names, one a line; an optional trailing index (LMPT's "traffic light 9") must match the line."""
    names = []
    for k, line in enumerate(read_lines(path, "class list")):
        tokens = line.split()
        if len(tokens) > 1 and tokens[-1].lstrip("-").isdigit():
            if int(tokens[-1]) != k:
                raise ValueError(f"{path}: line {k + 1} gives index {tokens[-1]} for class {tokens[:-1]}, expected {k}")
            tokens = tokens[:-1]
        names.append(" ".join(tokens))
    return names


def read_list(path, num_classes):
    """The "relative/path label label ..." list format -> [(relpath, sorted labels)]."""
    items = []
    for k, line in enumerate(read_lines(path, "image list")):
        relpath, *rest = line.split()
        try:
            labels = [int(t) for t in rest]
        except ValueError:
            raise ValueError(f"{path}:{k + 1}: labels must be integers: {line!r}") from None
        bad = [i for i in labels if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"{path}:{k + 1}: label {bad[0]} of {relpath} is out of range for {num_classes} classes")
        items.append((relpath, sorted(set(labels))))
    return items


def prepare_lists(train, test, classes, image_root, name, out_root="data", skip_bad=False):
    """Any dataset given as list files (LMPT's VOC-LT / COCO-LT lists, or a custom one)."""
    names = read_classes(classes)
    source = {"train_list": str(Path(train).resolve()), "test_list": str(Path(test).resolve()),
              "classes": str(Path(classes).resolve())}
    return _finish(out_root, name, names, Path(image_root), read_list(train, len(names)),
                   read_list(test, len(names)), source, skip_bad)


def _finish(out_root, name, classes, image_root, train, test, source, skip_bad):
    train, bad_train = verify_images(image_root, train, skip_bad, split="train")
    test, bad_test = verify_images(image_root, test, skip_bad, split="test")
    if bad_train or bad_test:
        print(f"skipped {bad_train} bad train and {bad_test} bad test images (--skip-bad-images)")
    source = dict(source, bad_images_skipped={"train": bad_train, "test": bad_test})
    return write_dataset(out_root, name, classes, image_root, train, test, source)

# -----------------------------------------------------------------------------
# long-tail split sampling (Wu et al. 2020)

# Wu et al. 2020 (DB loss, section 4.1 and appendix) built VOC-LT and COCO-LT by giving each class a
# target count from a Pareto distribution and drawing images class by class; their sampling code
# is not published, so the procedure below is ours, written from that description (a deviation to
# state): targets are quantiles of a Pareto distribution, classes are visited in order of how they
# co-occur with the ones already filled (rarest target first, so the labels that come along with an
# image land on classes not yet filled), images are added greedily to overshoot the filled classes
# least, then removed greedily where a class ended above its target.


def pareto_targets(num_classes, n_max, n_min, alpha):
    """Target counts, largest first: Pareto(alpha) quantiles truncated to [n_min, n_max].

    t_k = n_min * (1 - q_k)^(-1/alpha), q_k = (1 - (n_min/n_max)^alpha) * (C-1-k)/(C-1): evenly
    spaced probabilities, so t_0 = n_max and t_{C-1} = n_min.
    """
    k = np.arange(num_classes)
    q = (1 - (n_min / n_max) ** alpha) * (num_classes - 1 - k) / max(num_classes - 1, 1)
    return np.round(n_min * (1 - q) ** (-1 / alpha)).astype(np.int64)


def long_tail_split(labels, n_max, n_min, alpha, seed=0):
    """Indices (sorted) of a long-tailed subset of a multi-label pool.

    labels: (N, C) 0/1. Classes are ranked by co-occurrence, sum_{j != c} n_cj (label pairs class c
    forms in the pool): the class that co-occurs most gets n_max. (On VOC2012 trainval this ranking
    has Spearman 0.99 with the official VOC-LT counts; ranking by plain frequency has 0.69.)
    Targets are capped at what the pool holds.
    """
    import heapq
    y = np.asarray(labels).astype(bool)  # (N, C)
    n_img, n_cls = y.shape
    pool_freq = y.sum(0)
    pairs = y.T.astype(np.int64) @ y  # (C, C) n_ij, images holding both i and j
    cooccur = pairs.sum(1) - pool_freq  # (C,)
    rank = np.argsort(-cooccur, kind="stable")
    target = np.zeros(n_cls, np.int64)
    target[rank] = pareto_targets(n_cls, n_max, n_min, alpha)
    target = np.minimum(target, pool_freq)
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n_img)  # seeded order among equally good images
    n_labels = y.sum(1)
    chosen = np.zeros(n_img, bool)
    count = np.zeros(n_cls, np.int64)

    # add: smallest target first; an image's key is (labels on full classes, -labels on classes still
    # short of target): overshoot least, then fill the most other classes at once
    def key(i):
        full = count >= target
        return int(y[i] @ full), -int(y[i] @ ~full)

    for c in np.argsort(target, kind="stable"):
        if count[c] >= target[c]:
            continue
        heap = [key(i) + (int(tiebreak[i]), int(i)) for i in np.flatnonzero(y[:, c] & ~chosen)]
        heapq.heapify(heap)
        while count[c] < target[c] and heap:
            entry = heapq.heappop(heap)
            i = entry[-1]
            now = key(i)  # lazy greedy: keys only grow while adding ("full" only grows), so a
            if now > entry[:2]:  # popped entry whose key is still current is the true minimum
                heapq.heappush(heap, now + entry[2:])
                continue
            chosen[i] = True
            count += y[i]

    # remove: drop chosen images all of whose labels are above target, most labels first
    changed = True
    while changed:
        changed = False
        for c in np.argsort(-(count - target), kind="stable"):
            while count[c] > target[c]:
                idx = np.flatnonzero(chosen & y[:, c])
                ok = idx[(y[idx] <= (count > target)).all(1)]  # removing keeps every label >= target
                if len(ok) == 0:
                    break
                i = ok[np.lexsort((tiebreak[ok], -n_labels[ok]))[0]]
                chosen[i] = False
                count -= y[i]
                changed = True
    return np.flatnonzero(chosen)


def _make_split_items(pool, num_classes, name, seed, alpha=None, warn=True):
    """Run long_tail_split on [(relpath, labels)] -> (train items, source dict); warn when it
    replaces an official split."""
    limits = dict(LT_DEFAULTS[name])
    if alpha is not None:
        limits["alpha"] = alpha
    keep = long_tail_split(capnet.multihot(pool, num_classes), seed=seed, **limits)
    if warn:
        print(NOT_OFFICIAL.format(seed=seed, name=name), file=sys.stderr)
    source = {"official": False, "make_split": dict(limits, seed=seed, pool_images=len(pool),
                                                    method="Pareto targets + greedy add/remove (data_prep.py)")}
    return [pool[i] for i in keep], source

# -----------------------------------------------------------------------------
# synthetic-lt: procedurally drawn scenes and a small contrastively pretrained CLIP
#
# The embedded default (docs/synthetic-lt.md): a miniature of the real long-tailed multi-label
# problem (VOC-LT / COCO-LT with a web-trained CLIP), built so that each part of CAPNet has
# a job. Each image is a scene: a sky (day or night) above a ground (grass, water, sand or
# snow) with 1-5 objects drawn as small icons; where an object can appear depends on the
# scene ("fish" needs water, "moon" needs night), so labels co-occur in ways the names explain.
# The world's properties, each built on purpose (README, "The synthetic default"):
#  1. Pretraining is not the downstream task. CLIP learns from web-like captions (_SynCaptioner):
#     short, the salient object (drawn larger) named first, each other object only half the
#     time (the single-label bias of alt-text), and a class that has a synonym called by it half
#     the time ("yacht", "fir"). Its images are drawn in the "web" style, the labelled train and
#     test images in the "target" style: a global shift (_syn_target_look: every hue turned by
#     35 degrees, exposure, film grain; pebble clutter on the ground), so zero-shot is below
#     what training can reach in every group. Objects are drawn large enough (SYN_OBJECT_SCALE)
#     that CLIP reads them well in its own style, so what zero-shot loses is the shift.
#  2. Semantic families (SYN_FAMILIES): "tree" / "pine tree" / "palm tree", "boat" / "sailboat" /
#     "rowboat", "car" / "race car" / "police car" share a head word, and captions sometimes
#     call a member by it. Each family changes look together between the two styles (autumn
#     foliage, red-painted hulls, mud-brown paint: SYN_PALETTES); the head member is abundant in
#     train, the others scarce, and family members rarely share a scene (_syn_sample_scene,
#     family_mix), so the co-occurrence graph cannot link them and only the text graph can: the
#     paper's argument, built in on purpose. Whether the names end up close in the small CLIP's
#     text space is measured, not assumed (dataset.json "source", "text_neighbours").
#  3. Train long-tailed, test balanced. Three disjoint draws (own random streams):
#     train    long-tailed: each scene's anchor (salient) object is drawn from power-law class
#              weights (Pareto-like, as Wu et al. 2020's target counts), extra objects with
#              probability proportional to the same weights -> head / medium / tail non-empty,
#              every class present; target style;
#     test     balanced: uniform anchors, extra objects joining more readily where scenes seldom
#              allow them, so label counts come out near equal; target style;
#     pretrain balanced, web style, in memory only, with captions, for the small CLIP.
# The CLIP (ViT image tower, so AdaptFormer applies) is trained with the symmetric InfoNCE loss
# of Radford et al. 2021 and saved as a plain state dict with OpenAI's parameter names. What
# the properties give is measured at preparation and stored in dataset.json "source": zero-shot
# on the test scenes in both styles, family co-occurrence in train, text-space neighbours.

SYN_SKIES = ("day", "night")
SYN_GROUNDS = ("grass", "water", "sand", "snow")
# name -> (region, skies it appears under, grounds it appears on); "sky" objects are placed
# above the horizon, "ground" objects below it, "horizon" objects (mountains) stand on it.
# The order is the long-tail rank (head first): each family's head member (tree, boat, car)
# is among the most frequent classes, its relatives among the rarest.
SYN_OBJECTS = {
    "tree": ("ground", SYN_SKIES, ("grass",)),
    "person": ("ground", SYN_SKIES, ("grass", "sand", "snow")),
    "boat": ("ground", SYN_SKIES, ("water",)),
    "car": ("ground", SYN_SKIES, ("grass", "snow")),
    "cloud": ("sky", ("day",), SYN_GROUNDS),
    "house": ("ground", SYN_SKIES, ("grass", "snow")),
    "sun": ("sky", ("day",), SYN_GROUNDS),
    "bird": ("sky", ("day",), SYN_GROUNDS),
    "mountain": ("horizon", SYN_SKIES, ("grass", "snow")),
    "dog": ("ground", SYN_SKIES, ("grass", "sand", "snow")),
    "airplane": ("sky", SYN_SKIES, SYN_GROUNDS),
    "fish": ("ground", SYN_SKIES, ("water",)),
    "flower": ("ground", ("day",), ("grass",)),
    "moon": ("sky", ("night",), SYN_GROUNDS),
    "star": ("sky", ("night",), SYN_GROUNDS),
    "umbrella": ("ground", ("day",), ("sand",)),
    "pine tree": ("ground", SYN_SKIES, ("grass", "snow")),
    "snowman": ("ground", SYN_SKIES, ("snow",)),
    "sailboat": ("ground", ("day",), ("water",)),
    "race car": ("ground", ("day",), ("grass", "snow")),
    "crab": ("ground", ("day",), ("sand",)),
    "palm tree": ("ground", SYN_SKIES, ("sand",)),
    "rowboat": ("ground", ("day",), ("water",)),
    "police car": ("ground", SYN_SKIES, ("grass", "snow")),
}
SYN_CLASSES = list(SYN_OBJECTS)
# Property 2: families of classes whose names share a head word (close in text space), head
# member first; a family changes look together between the web and the target style.
SYN_FAMILIES = {"tree": ("tree", "pine tree", "palm tree"), "boat": ("boat", "sailboat", "rowboat"),
                "car": ("car", "race car", "police car")}
SYN_FAMILY_OF = {SYN_CLASSES.index(m): f for f, members in SYN_FAMILIES.items() for m in members}
# Web captions call an object by another word as alt-text does: a synonym ("yacht" for a
# sailboat, "fir" for a pine tree) or, for a family member, the family's word ("a tree" for a
# palm tree, "a boat" for a rowboat). The class name then is only one of the words the text
# encoder learned for the object, so zero-shot with "a photo of a {name}." is weaker for these
# classes than what labelled images can teach the prompts.
SYN_SYNONYMS = {"person": "man", "mountain": "peak", "airplane": "jet", "house": "cottage", "dog": "puppy",
                "boat": "ship", "car": "automobile", "pine tree": "fir", "sailboat": "yacht",
                "rowboat": "dinghy", "race car": "racer", "police car": "cruiser"}
SYN_CONTEXT_PHRASES = {"night": "at night", "grass": "on the grass", "water": "on the water",
                       "sand": "on the beach", "snow": "in the snow"}

SYN_SKY_RGB = {"day": (135, 195, 240), "night": (22, 26, 62)}
SYN_GROUND_RGB = {"grass": (72, 158, 60), "water": (38, 98, 188), "sand": (226, 202, 142),
                  "snow": (236, 240, 248)}
# Base colours the family painters use, per style. The target column is each family's shared
# change of look (property 2): autumn foliage for the trees, red paint for the boats' hulls,
# mud-brown for the cars' bodies (mixed 60% into whatever paint the car has).
SYN_PALETTES = {
    "web": {"foliage": (40, 130, 40), "pine": (20, 90, 50), "frond": (60, 170, 60),
            "hull": (120, 70, 35), "mud": None},
    "target": {"foliage": (222, 110, 28), "pine": (178, 64, 30), "frond": (214, 160, 40),
               "hull": (200, 36, 40), "mud": (112, 84, 52)},
}
# icons drawn larger than the rest so that they stay legible at 48 px (a person is thin)
SYN_ICON_SIZE = {"person": 1.4, "dog": 1.2, "car": 1.25, "race car": 1.25, "police car": 1.25}
# Every object's radius is this times 0.085-0.14 of the image (the v3 drawing; v2 drew them at 1x). Property 1 needs
# the objects legible to CLIP in its own style, so that the style shift, not the renderer, is what zero-shot loses:
# at 1x, zero-shot (one view, worlds 0 and 1) was 53-54 mAP in the web style, 42-43 in the labelled one; at 1.3x
# 58-59 and 41-44 (README "The synthetic default")
SYN_OBJECT_SCALE = 1.3
SYN_TARGET_SCALE = 1.0  # target style: objects drawn this much smaller (measured 0.8: the probe fell too)
SYN_TARGET_CLUTTER = (3, 7)  # target style: this many (low, high + 1) pebbles and leaves on the ground


def _jitter(rng, rgb, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _ellipse(d, x, y, rx, ry, fill, outline=None):
    d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=fill, outline=outline)


def _paint(rng, pal, rgb):
    """A car's paint: the colour jittered, then mixed 60% into the palette's mud (target style)."""
    c = _jitter(rng, rgb)
    return c if pal["mud"] is None else tuple(int(0.4 * a + 0.6 * b) for a, b in zip(c, pal["mud"]))


# Icon painters: draw(d, rng, x, y, r, sky, pal) with (x, y) the icon centre, r its half size,
# pal the style's SYN_PALETTES entry, on a canvas twice the final resolution (downsampled
# afterwards, which anti-aliases). A painter draws the same random numbers in both styles, so
# one scene seed gives the same scene in either style.
def _draw_sun(d, rng, x, y, r, sky, pal):
    _ellipse(d, x, y, r * 0.7, r * 0.7, _jitter(rng, (255, 214, 40)))


def _draw_moon(d, rng, x, y, r, sky, pal):
    _ellipse(d, x, y, r * 0.65, r * 0.65, _jitter(rng, (244, 242, 205), 8))
    _ellipse(d, x + r * 0.35, y - r * 0.15, r * 0.55, r * 0.55, sky)  # bite -> crescent


def _draw_star(d, rng, x, y, r, sky, pal):
    for _ in range(int(rng.integers(2, 5))):  # a few stars scattered around the anchor point
        sx, sy, s = x + rng.uniform(-1.5, 1.5) * r, y + rng.uniform(-0.8, 0.8) * r, r * 0.25
        colour = _jitter(rng, (255, 250, 210), 5)
        d.polygon([(sx, sy - 2 * s), (sx + s * 0.6, sy), (sx, sy + 2 * s), (sx - s * 0.6, sy)], fill=colour)
        d.polygon([(sx - 2 * s, sy), (sx, sy + s * 0.6), (sx + 2 * s, sy), (sx, sy - s * 0.6)], fill=colour)


def _draw_cloud(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, (250, 250, 252), 5)
    for dx, dy, k in ((-0.55, 0.1, 0.45), (0.0, -0.15, 0.6), (0.55, 0.1, 0.45)):
        _ellipse(d, x + dx * r, y + dy * r, k * r * 1.2, k * r, c)


def _draw_bird(d, rng, x, y, r, sky, pal):
    colour = (35, 35, 40)
    for _ in range(int(rng.integers(1, 4))):
        bx, by, s = x + rng.uniform(-1, 1) * r, y + rng.uniform(-0.5, 0.5) * r, r * rng.uniform(0.3, 0.45)
        d.line([(bx - s, by - s * 0.6), (bx, by), (bx + s, by - s * 0.6)], fill=colour, width=max(2, int(r / 6)))


def _draw_airplane(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, (196, 196, 206), 8)
    _ellipse(d, x, y, r, r * 0.2, c)
    d.polygon([(x - r * 0.1, y), (x + r * 0.3, y), (x - r * 0.3, y + r * 0.75)], fill=c)
    d.polygon([(x - r * 0.1, y), (x + r * 0.3, y), (x - r * 0.3, y - r * 0.75)], fill=c)
    d.polygon([(x - r, y), (x - r * 0.75, y), (x - r * 1.05, y - r * 0.45)], fill=c)


def _hull(d, rng, x, y, r, pal, depth=0.45, taper=0.7):
    d.polygon([(x - r, y), (x + r, y), (x + r * taper, y + r * depth), (x - r * taper, y + r * depth)],
              fill=_jitter(rng, pal["hull"]))


def _draw_boat(d, rng, x, y, r, sky, pal):
    _hull(d, rng, x, y, r, pal)
    d.rectangle([x - r * 0.35, y - r * 0.35, x + r * 0.3, y], fill=_jitter(rng, (235, 235, 225), 10))


def _draw_sailboat(d, rng, x, y, r, sky, pal):
    _hull(d, rng, x, y, r, pal)
    d.line([(x, y), (x, y - r * 1.4)], fill=(80, 50, 30), width=2)
    d.polygon([(x + r * 0.08, y - r * 1.4), (x + r * 0.08, y - r * 0.1), (x + r * 0.85, y - r * 0.1)],
              fill=_jitter(rng, (250, 250, 245), 5))


def _draw_rowboat(d, rng, x, y, r, sky, pal):
    _hull(d, rng, x, y, r * 0.75, pal, depth=0.35, taper=0.55)  # small open hull, two oars
    for s in (-1, 1):
        d.line([(x + s * r * 0.15, y - r * 0.3), (x + s * r * 0.9, y + r * 0.55)], fill=(90, 60, 30),
               width=max(2, int(r / 7)))
    _ellipse(d, x, y - r * 0.3, r * 0.14, r * 0.14, _jitter(rng, (240, 200, 160), 8))  # the rower's head


def _draw_fish(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, (250, 130, 30))
    _ellipse(d, x, y, r * 0.6, r * 0.35, c)
    d.polygon([(x + r * 0.5, y), (x + r, y - r * 0.35), (x + r, y + r * 0.35)], fill=c)
    _ellipse(d, x - r * 0.3, y - r * 0.08, r * 0.08, r * 0.08, (20, 20, 20))


def _draw_tree(d, rng, x, y, r, sky, pal):
    d.rectangle([x - r * 0.12, y - r * 0.1, x + r * 0.12, y + r], fill=_jitter(rng, (110, 70, 35)))
    _ellipse(d, x, y - r * 0.35, r * 0.6, r * 0.65, _jitter(rng, pal["foliage"]))


def _draw_pine_tree(d, rng, x, y, r, sky, pal):
    d.rectangle([x - r * 0.1, y + r * 0.5, x + r * 0.1, y + r], fill=_jitter(rng, (100, 65, 35)))
    c = _jitter(rng, pal["pine"])
    for k in range(3):  # three stacked tiers
        top, base = y - r + k * r * 0.45, y - r * 0.25 + k * r * 0.45
        half = r * (0.3 + 0.17 * k)
        d.polygon([(x, top), (x + half, base + r * 0.2), (x - half, base + r * 0.2)], fill=c)


def _draw_palm_tree(d, rng, x, y, r, sky, pal):
    lean = rng.uniform(-0.35, 0.35) * r
    d.line([(x, y + r), (x + lean, y - r * 0.55)], fill=_jitter(rng, (140, 95, 50)), width=max(2, int(r / 5)))
    tx, ty, c = x + lean, y - r * 0.55, _jitter(rng, pal["frond"])
    for ang in (-2.6, -2.0, -1.2, -0.5, 0.1):  # fronds drooping from the top
        d.line([(tx, ty), (tx + np.cos(ang) * r * 0.7, ty + np.sin(ang) * r * 0.35 + r * 0.3)], fill=c,
               width=max(2, int(r / 6)))


def _draw_flower(d, rng, x, y, r, sky, pal):
    d.line([(x, y), (x, y + r)], fill=(40, 140, 40), width=2)
    c = [(240, 80, 150), (200, 50, 200), (250, 60, 60), (255, 255, 255)][int(rng.integers(4))]
    for k in range(5):
        a = 2 * np.pi * k / 5
        _ellipse(d, x + np.cos(a) * r * 0.3, y + np.sin(a) * r * 0.3, r * 0.22, r * 0.22, c)
    _ellipse(d, x, y, r * 0.15, r * 0.15, (255, 210, 0))


def _draw_house(d, rng, x, y, r, sky, pal):
    d.rectangle([x - r * 0.6, y - r * 0.2, x + r * 0.6, y + r * 0.7], fill=_jitter(rng, (230, 215, 180)))
    d.polygon([(x - r * 0.8, y - r * 0.2), (x + r * 0.8, y - r * 0.2), (x, y - r * 0.9)], fill=_jitter(rng, (190, 50, 40)))
    d.rectangle([x - r * 0.12, y + r * 0.25, x + r * 0.12, y + r * 0.7], fill=(90, 60, 40))


def _wheels(d, x, y, r, k=0.22):
    for wx in (x - r * 0.55, x + r * 0.55):
        _ellipse(d, wx, y + r * 0.38, r * k, r * k, (25, 25, 25))


def _draw_car(d, rng, x, y, r, sky, pal):
    c = _paint(rng, pal, [(220, 30, 30), (30, 60, 200), (240, 200, 20), (230, 230, 230)][int(rng.integers(4))])
    d.rectangle([x - r, y - r * 0.1, x + r, y + r * 0.35], fill=c)
    d.polygon([(x - r * 0.5, y - r * 0.1), (x - r * 0.3, y - r * 0.5), (x + r * 0.35, y - r * 0.5),
               (x + r * 0.55, y - r * 0.1)], fill=c)
    _wheels(d, x, y, r)


def _draw_race_car(d, rng, x, y, r, sky, pal):
    c = _paint(rng, pal, [(230, 20, 20), (20, 150, 60), (250, 200, 0)][int(rng.integers(3))])
    d.polygon([(x - r, y - r * 0.25), (x + r * 0.2, y - r * 0.15), (x + r * 1.1, y + r * 0.15),
               (x + r, y + r * 0.35), (x - r, y + r * 0.35)], fill=c)  # low wedge body
    d.rectangle([x - r * 1.05, y - r * 0.5, x - r * 0.8, y - r * 0.2], fill=c)  # rear wing
    d.line([(x - r * 0.9, y + r * 0.1), (x + r * 0.8, y + r * 0.2)], fill=(250, 250, 250), width=2)  # stripe
    _wheels(d, x, y, r, k=0.25)


def _draw_police_car(d, rng, x, y, r, sky, pal):
    white = _paint(rng, pal, (240, 240, 240))
    d.rectangle([x - r, y - r * 0.1, x + r, y + r * 0.35], fill=(20, 20, 30))  # dark lower body
    d.rectangle([x - r * 0.45, y - r * 0.1, x + r * 0.45, y + r * 0.35], fill=white)  # white doors
    d.polygon([(x - r * 0.5, y - r * 0.1), (x - r * 0.3, y - r * 0.5), (x + r * 0.35, y - r * 0.5),
               (x + r * 0.55, y - r * 0.1)], fill=white)
    d.rectangle([x - r * 0.22, y - r * 0.68, x, y - r * 0.5], fill=(30, 80, 255))  # light bar
    d.rectangle([x, y - r * 0.68, x + r * 0.22, y - r * 0.5], fill=(255, 30, 30))
    _wheels(d, x, y, r)


def _draw_dog(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, [(150, 100, 50), (60, 45, 35), (215, 180, 120)][int(rng.integers(3))])
    _ellipse(d, x, y, r * 0.55, r * 0.28, c)
    _ellipse(d, x - r * 0.6, y - r * 0.3, r * 0.25, r * 0.22, c)
    for lx in (x - r * 0.4, x - r * 0.15, x + r * 0.2, x + r * 0.42):
        d.line([(lx, y), (lx, y + r * 0.6)], fill=c, width=max(2, int(r / 7)))
    d.line([(x + r * 0.5, y - r * 0.05), (x + r * 0.85, y - r * 0.4)], fill=c, width=2)


def _draw_person(d, rng, x, y, r, sky, pal):
    skin = _jitter(rng, [(240, 200, 160), (170, 120, 80), (110, 75, 50)][int(rng.integers(3))], 8)
    shirt = _jitter(rng, [(200, 40, 40), (40, 80, 200), (240, 200, 30), (30, 30, 30)][int(rng.integers(4))])
    _ellipse(d, x, y - r * 0.75, r * 0.2, r * 0.2, skin)
    d.rectangle([x - r * 0.2, y - r * 0.55, x + r * 0.2, y + r * 0.15], fill=shirt)
    d.line([(x - r * 0.2, y - r * 0.5), (x - r * 0.45, y)], fill=skin, width=2)
    d.line([(x + r * 0.2, y - r * 0.5), (x + r * 0.45, y)], fill=skin, width=2)
    legs = (45, 45, 70)
    d.line([(x - r * 0.1, y + r * 0.15), (x - r * 0.2, y + r * 0.9)], fill=legs, width=max(2, int(r / 6)))
    d.line([(x + r * 0.1, y + r * 0.15), (x + r * 0.2, y + r * 0.9)], fill=legs, width=max(2, int(r / 6)))


def _draw_mountain(d, rng, x, y, r, sky, pal):
    w, h = r * 2.2, r * 1.8  # y is the horizon: the mountain stands on it
    d.polygon([(x - w, y), (x + w, y), (x, y - h)], fill=_jitter(rng, (120, 115, 125), 10))
    d.polygon([(x - w * 0.28, y - h * 0.72), (x + w * 0.28, y - h * 0.72), (x, y - h)], fill=(248, 248, 252))


def _draw_umbrella(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, [(230, 40, 40), (40, 120, 230), (250, 160, 20)][int(rng.integers(3))])
    d.line([(x, y - r * 0.5), (x, y + r)], fill=(90, 90, 90), width=2)
    d.pieslice([x - r, y - r * 1.1, x + r, y + r * 0.1], 180, 360, fill=c)
    d.pieslice([x - r * 0.35, y - r * 1.1, x + r * 0.35, y + r * 0.1], 180, 360, fill=(250, 250, 250))


def _draw_crab(d, rng, x, y, r, sky, pal):
    c = _jitter(rng, (215, 45, 35))
    for s in (-1, 1):
        for k in range(3):
            d.line([(x + s * r * 0.3, y + k * r * 0.1), (x + s * r * 0.75, y + r * 0.2 + k * r * 0.15)], fill=c, width=2)
        d.line([(x + s * r * 0.3, y - r * 0.1), (x + s * r * 0.6, y - r * 0.5)], fill=c, width=2)
        _ellipse(d, x + s * r * 0.62, y - r * 0.6, r * 0.17, r * 0.14, c)
    _ellipse(d, x, y, r * 0.45, r * 0.3, c)


def _draw_snowman(d, rng, x, y, r, sky, pal):
    white, line = (255, 255, 255), (150, 160, 175)
    _ellipse(d, x, y + r * 0.45, r * 0.5, r * 0.5, white, line)
    _ellipse(d, x, y - r * 0.3, r * 0.35, r * 0.35, white, line)
    _ellipse(d, x - r * 0.12, y - r * 0.38, r * 0.05, r * 0.05, (20, 20, 20))
    _ellipse(d, x + r * 0.12, y - r * 0.38, r * 0.05, r * 0.05, (20, 20, 20))
    d.polygon([(x, y - r * 0.3), (x + r * 0.3, y - r * 0.25), (x, y - r * 0.22)], fill=(250, 130, 20))


SYN_PAINTERS = {name: globals()["_draw_" + name.replace(" ", "_")] for name in SYN_CLASSES}
SYN_FLOATING = ("boat", "sailboat", "rowboat")  # drawn near the water's surface


def _syn_compatible(sky, ground):
    """(C,) bool: which classes can appear in a scene with this sky and ground."""
    return np.array([sky in skies and ground in grounds for _, skies, grounds in SYN_OBJECTS.values()])


def _syn_sample_scene(rng, anchor_p, extra_p, max_objects=5, family_mix=0.05):
    """One scene -> (sorted labels, sky, ground, anchor). The anchor (the salient object) is drawn
    from anchor_p, then a sky and ground it allows, then every other compatible class joins
    independently with probability extra_p[c] (at most max_objects in all). Property 2: a class
    of a family already in the scene joins only with probability family_mix (a palm tree on
    sand, a tree on grass, seldom both), so family members rarely co-occur."""
    anchor = int(rng.choice(len(SYN_CLASSES), p=anchor_p))
    _, skies, grounds = SYN_OBJECTS[SYN_CLASSES[anchor]]
    sky, ground = skies[int(rng.integers(len(skies)))], grounds[int(rng.integers(len(grounds)))]
    extra = _syn_compatible(sky, ground) & (rng.random(len(SYN_CLASSES)) < extra_p)
    extra[anchor] = False
    labels, families = [anchor], {SYN_FAMILY_OF.get(anchor)}
    for c in rng.permutation(np.flatnonzero(extra)).tolist():
        if len(labels) == max_objects:
            break
        family = SYN_FAMILY_OF.get(c)
        if family is not None and family in families and rng.random() >= family_mix:
            continue
        labels.append(c)
        families.add(family)
    return sorted(labels), sky, ground, anchor


def _syn_colour_turn(degrees):
    """(3, 3) rotation of RGB about the grey axis (Rodrigues): turns every hue by `degrees` and
    keeps greys grey, as a camera with another colour balance under other light would."""
    t, k = math.radians(degrees), np.ones(3) / math.sqrt(3)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return (np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K).astype(np.float32)


SYN_TARGET_TURN = _syn_colour_turn(35.0)


def _syn_target_look(img, rng):
    """Property 1, the global part of the style shift (uint8 (S, S, 3) -> uint8): the labelled
    camera sees every colour turned by 35 degrees of hue (sand goes lime, grass teal, the sky
    lavender), at a random exposure (x0.9-1), with film grain (Gaussian, sd 5 levels).
    Calibrated on zero-shot and a linear probe of the frozen CLIP features (test scenes drawn
    in both styles): a hue turn moves the features away from the
    text while keeping the classes apart (30 degrees: zero-shot 48 -> 38 mAP, probe 45; 60
    degrees: zero-shot 23, below twice chance); the first look tried, a washed-out, darkened
    evening light with objects 0.8x smaller, took zero-shot from 51 to 21."""
    x = img.astype(np.float32) @ SYN_TARGET_TURN.T
    x = x * rng.uniform(0.9, 1.0) + rng.normal(0, 5, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _syn_render(seed, labels, anchor, sky, ground, size, style="web"):
    """Draw one scene at 2x, downsample (box filter) -> uint8 (size, size, 3). The scene (sky
    and ground tones, horizon, object sizes, places and colours) comes from `seed` alone, the
    same in either style; the style sets the palette of the families, and "target" adds the
    global shift: objects SYN_TARGET_SCALE smaller, pebble clutter, _syn_target_look. The anchor (salient
    object) is drawn 1.3x larger."""
    from PIL import Image, ImageDraw
    rng, style_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    pal, target = SYN_PALETTES[style], style == "target"
    S = 2 * size
    sky_rgb = _jitter(rng, SYN_SKY_RGB[sky], 12)
    img = Image.new("RGB", (S, S), sky_rgb)
    d = ImageDraw.Draw(img)
    h = S * rng.uniform(0.42, 0.56)  # horizon
    scale = SYN_TARGET_SCALE if target else 1.0
    names = {c: SYN_CLASSES[c] for c in labels}
    r_of = {c: S * SYN_OBJECT_SCALE * rng.uniform(0.085, 0.14) * (1.3 if c == anchor else 1.0)
            * SYN_ICON_SIZE.get(names[c], 1.0) * scale for c in labels}
    mountain = SYN_CLASSES.index("mountain")
    if mountain in r_of:
        _draw_mountain(d, rng, S * rng.uniform(0.25, 0.75), h, r_of[mountain], sky_rgb, pal)
    d.rectangle([0, h, S, S], fill=_jitter(rng, SYN_GROUND_RGB[ground], 10))
    if ground == "water":  # a few lighter ripples
        for _ in range(4):
            wx, wy = rng.uniform(0, S), rng.uniform(h + 4, S - 2)
            d.line([(wx, wy), (wx + S * 0.12, wy)], fill=_jitter(rng, (90, 150, 225), 8), width=1)
    if target:  # clutter: pebbles and leaves on the ground, no class of their own
        for _ in range(int(style_rng.integers(*SYN_TARGET_CLUTTER))):
            px, py, pr = style_rng.uniform(0, S), style_rng.uniform(h + 2, S), S * style_rng.uniform(0.012, 0.03)
            c = [(90, 80, 70), (150, 140, 120), (120, 90, 40), (60, 70, 50)][int(style_rng.integers(4))]
            _ellipse(d, px, py, pr * 1.4, pr, c)
    # sky objects first, then ground objects far to near (small y first) so nearer ones overlap
    todo = ([c for c in labels if SYN_OBJECTS[names[c]][0] == "sky"]
            + [c for c in labels if SYN_OBJECTS[names[c]][0] == "ground"])
    placed, spots = [], []
    for c in todo:
        n, r = names[c], r_of[c]
        if SYN_OBJECTS[n][0] == "sky":
            lo, hi = r, max(r + 1, h - r)
        elif n == "fish":  # under the surface
            lo, hi = h + r * 0.6, max(h + r * 0.6 + 1, S - r * 0.5)
        elif n in SYN_FLOATING:
            lo, hi = h + r * 0.3, max(h + r * 0.3 + 1, h + (S - h) * 0.7)
        else:
            lo, hi = h + r * 0.2, max(h + r * 0.2 + 1, S - r)
        # best of a few candidate spots: the one farthest from what is already placed
        cand = np.stack([rng.uniform(r, S - r, 4), rng.uniform(lo, hi, 4)], 1)  # (4, 2)
        if placed:
            cand = cand[int(np.linalg.norm(cand[:, None] - np.array(placed)[None], axis=-1).min(1).argmax())]
        else:
            cand = cand[0]
        placed.append(cand)
        spots.append((float(cand[1]), n, float(cand[0]), r))
    sky_spots = [s for s in spots if SYN_OBJECTS[s[1]][0] == "sky"]
    ground_spots = sorted(s for s in spots if SYN_OBJECTS[s[1]][0] == "ground")
    for y, n, x, r in sky_spots + ground_spots:
        SYN_PAINTERS[n](d, rng, x, y, r, sky_rgb, pal)
    out = np.asarray(img.reduce(2))
    return _syn_target_look(out, style_rng) if target else out


def _syn_draw_split(rng, n, anchor_p, extra_p, size, styles=("target",), family_mix=0.05, max_objects=5):
    """n scenes -> ({style: uint8 images (n, size, size, 3)}, labels, anchors, contexts
    [(sky, ground)]). Every style draws the same scenes (one seed per scene)."""
    labels, anchors, contexts, jobs = [], [], [], []
    for i in range(n):
        lab, sky, ground, anchor = _syn_sample_scene(rng, anchor_p, extra_p, max_objects, family_mix)
        seed = int(rng.integers(2**63))
        jobs += [(seed, lab, anchor, sky, ground, size, s) for s in styles]
        labels.append(lab)
        anchors.append(anchor)
        contexts.append((sky, ground))
    images = {s: np.empty((n, size, size, 3), np.uint8) for s in styles}
    for j, img in enumerate(_syn_render_all(jobs)):
        images[styles[j % len(styles)]][j // len(styles)] = img
    return images, labels, anchors, contexts


def _syn_render_all(jobs):
    """_syn_render(*job) for each job, in order, over the machine's cores: each image is a pure function of its
    job (its own seed), so how the jobs are shared out changes no pixel. Forked workers (Linux); else one process."""
    cores = len(os.sched_getaffinity(0)) if sys.platform == "linux" else 1
    if cores < 2 or len(jobs) < 200:
        return [_syn_render(*job) for job in jobs]
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        return pool.starmap(_syn_render, jobs, chunksize=50)


# Captions are assembled from the BPE tokens of their words. CLIP's tokenizer splits text into
# words and punctuation before BPE, so this equals tokenizing the whole string (checked in
# the tests), and is much faster than re-tokenizing a fresh caption every step.
SYN_CAPTION_PREFIXES = ("a photo of", "a picture of", "an image of", "")


class _SynCaptioner:
    """Web-like captions (property 1): 'a photo of a yacht on the water.'. The salient object
    (the scene's anchor, drawn larger) is always named, first; every other object only with
    probability p_mention (the single-label bias of alt-text). A family member other than the
    head is called by the family's word with probability p_family_word; otherwise a word is
    the class's SYN_SYNONYMS word with probability p_synonym, else its class name. A third of
    the captions add the scene phrase. Always "a {word}" (never "an"), to match the zero-shot
    template "a photo of a {name}."."""

    def __init__(self, encode, p_mention=0.5, p_synonym=0.5, p_family_word=0.15):
        self.p_mention, self.p_synonym, self.p_family_word = p_mention, p_synonym, p_family_word
        self.name = [encode("a " + n) for n in SYN_CLASSES]
        self.synonym = [encode("a " + SYN_SYNONYMS[n]) if n in SYN_SYNONYMS else None for n in SYN_CLASSES]
        self.family_word = [encode("a " + SYN_FAMILY_OF[c]) if SYN_FAMILY_OF.get(c, n) != n else None
                            for c, n in enumerate(SYN_CLASSES)]
        self.prefix = [encode(p) for p in SYN_CAPTION_PREFIXES]
        self.context = {k: encode(v) for k, v in SYN_CONTEXT_PHRASES.items()}
        self.comma, self.and_, self.dot = encode(","), encode("and"), encode(".")

    def vocabulary(self):
        """Every token id a caption can hold (padding 0 included)."""
        parts = [*self.name, *self.prefix, *self.context.values(), self.comma, self.and_, self.dot]
        parts += [t for t in self.synonym + self.family_word if t is not None]
        return {0, capnet.SOT, capnet.EOT} | {i for part in parts for i in part}

    def tokens(self, rng, labels, anchor, sky, ground):
        others = [c for c in labels if c != anchor and rng.random() < self.p_mention]
        said = [anchor] + [others[i] for i in rng.permutation(len(others))]
        ids = list(self.prefix[int(rng.integers(len(self.prefix)))])
        for k, c in enumerate(said):
            if k > 0:
                ids += self.and_ if k == len(said) - 1 else self.comma
            u = rng.random()
            if self.family_word[c] is not None and u < self.p_family_word:
                ids += self.family_word[c]
            elif self.synonym[c] is not None and u > 1 - self.p_synonym:
                ids += self.synonym[c]
            else:
                ids += self.name[c]
        if rng.random() < 1 / 3:
            phrases = [self.context[k] for k in (sky, ground) if k in self.context]
            if phrases:
                ids += phrases[int(rng.integers(len(phrases)))]
        return [capnet.SOT, *ids, *self.dot, capnet.EOT]


def _syn_to_tensor(images):
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), as capnet's resize, centre crop and to_tensor give at size S."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
    mean, std = torch.tensor(capnet.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(capnet.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _syn_augment(rng, x):
    """Zoom the batch by 1-1.4x (bilinear), crop each image back at a random offset, mirror half:
    CAPNet later sees random resized crops and 248/224-zoomed five-crop views of these images."""
    B, _, S, _ = x.shape
    Z = int(round(S * rng.uniform(1.0, 1.4)))
    if Z > S:
        x = F.interpolate(x, size=(Z, Z), mode="bilinear", align_corners=False)  # (B, 3, Z, Z)
    off = rng.integers(0, Z - S + 1, size=(B, 2))
    x = torch.stack([x[i, :, a:a + S, b:b + S] for i, (a, b) in enumerate(off)])  # (B, 3, S, S)
    flip = torch.from_numpy(rng.random(B) < 0.5)
    return torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)


def init_clip_like_openai(model):
    """OpenAI's initialisation of a CLIP trained from scratch (openai/CLIP model.py); capnet.CLIP itself only
    ever receives checkpoint weights, so the synthetic world's pretraining (and bench.py's random-weight
    models) call this right after constructing one."""
    nn_init = torch.nn.init
    nn_init.normal_(model.token_embedding.weight, std=0.02)
    nn_init.normal_(model.positional_embedding, std=0.01)
    if isinstance(model.visual, capnet.ModifiedResNet):
        pool = model.visual.attnpool
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn_init.normal_(proj.weight, std=pool.c_proj.in_features ** -0.5)
        for name, p in model.visual.named_parameters():
            if name.endswith("bn3.weight"):
                nn_init.zeros_(p)  # each residual branch starts as zero
    width, layers = model.transformer.width, model.transformer.layers
    proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
    for block in model.transformer.resblocks:
        nn_init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn_init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn_init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn_init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn_init.normal_(model.text_projection, std=width ** -0.5)
    return model


# The small CLIP's temperature during pretraining. OpenAI's released CLIPs end at the clamp, exp(t) = 100, and
# CAPNet meets that scale on real data; a small CLIP that learns t from 1/0.07 ends near 14 in 1,000 steps (16 with
# t's lr 10x: the loss itself holds t there). So t is not learned: it rises log-linearly from 1/0.07 to 100 over the
# first half of the steps and stays there ("ramp", 0.5). ("fixed", None): 100 from step 0; ("learned", k): t trains
# at lr * k. Chosen on CLIP-side measurements only (docs/synthetic-lt.md, "The small CLIP's temperature").
SYN_TEMPERATURE = ("ramp", 0.5)


def _syn_pretrain(model, images, labels, anchors, contexts, captioner, rng, steps, batch_size, lr, log=print,
                  temperature=SYN_TEMPERATURE):
    """Symmetric InfoNCE (image->text and text->image cross-entropy over the batch, Radford et
    al. 2021) with AdamW, linear warm-up and cosine decay; logit scale exp(t) as `temperature` says
    (SYN_TEMPERATURE), clamped at 100.

    Captions use a few dozen of the 49,408 token ids. A row that never gets a gradient never
    moves under AdamW (its moments stay zero and embeddings take no weight decay), so the
    steps train a compact copy of just the rows the captioner can emit and write it back at
    the end: the same updates as training the whole table, without carrying 4.7M zero
    gradients and their optimizer state through every step (a third of a step's time)."""
    vocab = torch.tensor(sorted(captioner.vocabulary()))  # (V,) token ids the captions can hold
    compact = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
    compact[vocab] = torch.arange(len(vocab))
    table = torch.nn.Parameter(model.token_embedding.weight.detach()[vocab].clone())  # (V, W)
    params = [(n, p) for n, p in model.named_parameters() if n != "token_embedding.weight"] + [("token_embedding", table)]
    mode, knob = temperature
    t_start, t_end = math.log(1 / 0.07), math.log(100.0)
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n) and n != "logit_scale"]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    if mode == "learned":  # t trains from ln(1 / 0.07) at lr * knob
        groups.append({"params": [model.logit_scale], "weight_decay": 0.0, "lr": lr * knob})
    else:  # fixed at ln 100, or set each step by the ramp: never a parameter of the optimizer
        model.logit_scale.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    order, pos, t0 = rng.permutation(len(images)), 0, time.time()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = np.sort(order[pos:pos + batch_size])
        pos += batch_size
        if mode != "learned":  # fixed: ln 100 throughout; ramp: ln(1/0.07) -> ln 100 over the first knob of the steps
            frac = 1.0 if mode == "fixed" else min(1.0, step / max(1.0, knob * steps))
            with torch.no_grad():
                model.logit_scale.fill_(t_start + frac * (t_end - t_start))
        x = _syn_augment(rng, _syn_to_tensor(images[idx]))  # (B, 3, S, S)
        caps = [captioner.tokens(rng, labels[i], anchors[i], *contexts[i]) for i in idx]
        tokens = torch.zeros(len(caps), max(map(len, caps)), dtype=torch.long)  # (B, L), zero padded
        for i, c in enumerate(caps):
            tokens[i, :len(c)] = torch.tensor(c)
        img = F.normalize(model.encode_image(x), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text_embeddings(table[compact[tokens]], tokens.argmax(dim=-1)), dim=-1)  # (B, D)
        logits = model.logit_scale.exp() * img @ txt.t()  # (B, B)
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"  pretrain step {step + 1}/{steps}  loss {loss.item():.3f}  exp(t) {model.logit_scale.exp().item():.1f}  "
                f"{time.time() - t0:.0f}s")
    with torch.no_grad():
        model.token_embedding.weight[vocab] = table
    model.logit_scale.requires_grad_(True)
    model.eval()
    return float(loss.item())


@torch.no_grad()
def _syn_zero_shot(model, images, labels, train_counts, batch_size=256):
    """Zero-shot AP per class (percent) and lt_map with the prompt "a photo of a {name}.",
    one view per image (the saved size is the CLIP's input size)."""
    text = capnet.tokenize([f"a photo of a {n}." for n in SYN_CLASSES])  # (C, 77)
    tf = F.normalize(model.encode_text(text), dim=-1)  # (C, D)
    imf = torch.cat([F.normalize(model.encode_image(_syn_to_tensor(images[i:i + batch_size])), dim=-1)
                     for i in range(0, len(images), batch_size)])  # (N, D)
    ap = capnet.average_precision(imf @ tf.t(), capnet.multihot([(None, lab) for lab in labels], len(SYN_CLASSES)))
    return ap * 100, capnet.lt_map(ap, train_counts)


@torch.no_grad()
def _syn_text_neighbours(model):
    """{class: (nearest other class in CLIP's text space, cosine)} for the prompt "a photo of a {name}."."""
    g = capnet.zero_shot_text_features(model, SYN_CLASSES)  # (C, D), normalised
    sim = (g @ g.t()).fill_diagonal_(-2.0)  # (C, C)
    best = sim.max(dim=1)
    return {n: (SYN_CLASSES[int(j)], round(float(v), 3)) for n, v, j in zip(SYN_CLASSES, best.values, best.indices)}


def syn_family_cooccurrence(labels):
    """{family: [images holding two or more members, images holding any member]} of a label list."""
    out = {}
    for family, members in SYN_FAMILIES.items():
        idx = {SYN_CLASSES.index(m) for m in members}
        n = [len(idx & set(lab)) for lab in labels]
        out[family] = [sum(k >= 2 for k in n), sum(k >= 1 for k in n)]
    return out


def _syn_save_png(img_array, path):
    from PIL import Image
    Image.fromarray(img_array).save(path, optimize=False, compress_level=1)


def make_synthetic_lt(root="data", seed=0, *, size=48, n_train=1500, n_test=1000, n_pretrain=12000,
                      pretrain_steps=1000, batch_size=64, lr=1e-3, patch=8, width=96, layers=3,
                      text_width=96, text_layers=2, embed_dim=96, tail_exponent=1.4, extra_rate=0.3,
                      test_extra_rate=0.25, pretrain_extra_rate=0.25, family_mix=0.05, p_mention=0.5,
                      p_synonym=0.5, p_family_word=0.15, temperature=SYN_TEMPERATURE, log=print):
    """Draw the synthetic-lt world and pretrain its CLIP -> Path of <root>/synthetic-lt/dataset.json.

    Writes <root>/synthetic-lt/{dataset.json, images/{train,test}/*.png, clip.pt}. The keyword
    knobs exist for tests; the defaults are the embedded benchmark. Long tail: class k (in
    SYN_CLASSES order) has weight w_k = (k + 1)^-tail_exponent; a train scene's anchor is class k
    with probability w_k / sum(w), and every other class the scene allows joins with probability
    extra_rate * w_k / w_0. Test and pretraining scenes: uniform anchors; pretraining scenes a
    constant join rate, test scenes one that evens out the label counts.
    Train and test are drawn in the target style, pretraining scenes in the web style."""
    log = log or (lambda message: None)
    out = Path(root) / "synthetic-lt"
    C = len(SYN_CLASSES)
    w = (np.arange(C) + 1.0) ** -tail_exponent
    uniform, t0 = np.full(C, 1 / C), time.time()
    draw = lambda stream, n, anchor_p, extra_p, styles=("target",): _syn_draw_split(
        np.random.default_rng([seed, stream]), n, anchor_p, extra_p, size, styles, family_mix)
    # one random stream per split, so a size knob of one split never reshuffles another
    train = draw(0, n_train, w / w.sum(), extra_rate * w / w[0])
    counts = capnet.class_counts([(None, lab) for lab in train[1]], C)
    groups = [capnet.class_group(int(n)) for n in counts]
    if not {"head", "medium", "tail"} <= set(groups) or counts.min() == 0:
        raise ValueError(f"synthetic-lt: n_train={n_train} gives per-class train counts {counts.tolist()}; head, "
                         f"medium and tail must all be non-empty and every class present (raise n_train)")
    # test: every class equally often anchor, and a class the scenes seldom allow (crab: beach by
    # day) joins more readily than one they always allow (airplane), so label counts come out
    # near equal (test_extra_rate for a class allowed in an average share of scenes). The test
    # scenes are also drawn in the web style (kept in memory) to measure the style shift.
    allowed = np.mean([_syn_compatible(s, g) for s in SYN_SKIES for g in SYN_GROUNDS], axis=0)  # (C,)
    test = draw(1, n_test, uniform, np.minimum(test_extra_rate * allowed.mean() / allowed, 0.9), ("target", "web"))
    for split, images in (("train", train[0]["target"]), ("test", test[0]["target"])):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            _syn_save_png(img, out / "images" / split / f"{i:05d}.png")
    log(f"synthetic-lt: drew {n_train} train + {n_test} test scenes ({size}px) in {time.time() - t0:.1f}s")

    pre = draw(2, n_pretrain, uniform, np.full(C, pretrain_extra_rate), ("web",))
    log(f"synthetic-lt: drew {n_pretrain} captioned pretraining scenes, {time.time() - t0:.1f}s")
    # One thread: the same seed gives the same weights whatever the core count (a multi-threaded GEMM
    # may split its sums by it; another CPU's kernels still round differently: README "Across machines"),
    # and these small matrices gain little from more.
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        # OpenAI's constructor (heads = width // 64, as build_clip infers). Context 77 as every
        # CLIP: CAPNet's prompts need 1 + 16 + name + 2 positions; captions are shorter, so
        # positions past them keep their initial values (no input ever reads them).
        model = init_clip_like_openai(capnet.CLIP(embed_dim, size, layers, width, patch, 77, 49408, text_width,
                                                  text_width // 64, text_layers))
        captioner = _SynCaptioner(capnet._tokenizer().encode, p_mention, p_synonym, p_family_word)
        final_loss = _syn_pretrain(model, pre[0]["web"], pre[1], pre[2], pre[3], captioner,
                                   np.random.default_rng([seed, 3]), pretrain_steps, batch_size, lr, log, temperature)
        clip_path = out / "clip.pt"
        tmp = out / "clip.pt.tmp"
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, clip_path)  # atomic: never a half-written checkpoint
        clip = capnet.load_clip(clip_path)  # measure what users will load
        ap, zs = _syn_zero_shot(clip, test[0]["target"], test[1], counts)
        _, zs_web = _syn_zero_shot(clip, test[0]["web"], test[1], counts)
        neighbours = _syn_text_neighbours(clip)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    fmt = lambda m: f"{m['total']:.1f} (head {m['head']:.1f}, medium {m['medium']:.1f}, tail {m['tail']:.1f})"
    log(f"synthetic-lt: pretrained CLIP in {pretrain_steps} steps (final loss {final_loss:.3f}, logit scale "
        f"{clip.logit_scale.exp().item():.1f}); zero-shot mAP, "
        f"one view: test scenes {fmt(zs)}; the same scenes in the web style {fmt(zs_web)}")
    family_pairs = syn_family_cooccurrence(train[1])
    log("synthetic-lt: families (train images with 2+ members / with any; text-space nearest neighbour): "
        + "; ".join(f"{f} {family_pairs[f][0]}/{family_pairs[f][1]} ("
                    + ", ".join(f"{m}->{neighbours[m][0]}" for m in members) + ")"
                    for f, members in SYN_FAMILIES.items()))
    log(f"synthetic-lt: {time.time() - t0:.0f}s in all")

    source = {
        "generator": "data_prep.py synthetic-lt (make_synthetic_lt)", "seed": seed, "image_size": size,
        "n_train": n_train, "n_test": n_test, "tail_exponent": tail_exponent, "extra_rate": extra_rate,
        "test_extra_rate": test_extra_rate, "max_objects": 5, "family_mix": family_mix,
        "object_scale": SYN_OBJECT_SCALE,
        "scenes": {"skies": list(SYN_SKIES), "grounds": list(SYN_GROUNDS),
                   "objects": {n: {"region": r, "skies": list(s), "grounds": list(g)}
                               for n, (r, s, g) in SYN_OBJECTS.items()}},
        "families": {f: list(m) for f, m in SYN_FAMILIES.items()},
        "family_cooccurrence_train": family_pairs,
        "styles": {"pretrain": "web", "train and test": "target", "palettes": SYN_PALETTES,
                   "target": f"hue turned 35 degrees, exposure x0.9-1, grain sd 5, {SYN_TARGET_CLUTTER[0]}-"
                             f"{SYN_TARGET_CLUTTER[1] - 1} pebbles, objects x{SYN_TARGET_SCALE}"},
        "clip": {"file": "clip.pt", "sha256": clip.source["sha256"],
                 "vision": f"ViT width {width}, {layers} blocks, patch {patch}, {size}px", "embed_dim": embed_dim,
                 "text": f"width {text_width}, {text_layers} blocks, context 77", "pretrain_images": n_pretrain,
                 "pretrain_steps": pretrain_steps, "batch_size": batch_size, "lr": lr, "p_mention": p_mention,
                 "p_synonym": p_synonym, "synonyms": SYN_SYNONYMS,
                 "p_family_word": p_family_word, "pretrain_extra_rate": pretrain_extra_rate, "loss": "symmetric InfoNCE",
                 "temperature": list(temperature), "logit_scale": round(clip.logit_scale.exp().item(), 4),
                 "final_loss": round(final_loss, 4)},
        "zero_shot_map": {k: round(v, 2) for k, v in zs.items() if k != "n_nan"},
        "zero_shot_map_web_style": {k: round(v, 2) for k, v in zs_web.items() if k != "n_nan"},
        "zero_shot_ap": {n: round(float(a), 2) for n, a in zip(SYN_CLASSES, ap)},
        "text_neighbours": neighbours,
        "seconds": round(time.time() - t0, 1),
    }
    items = lambda split, labels: [(f"{split}/{i:05d}.png", lab) for i, lab in enumerate(labels)]
    return write_dataset(root, "synthetic-lt", SYN_CLASSES, out / "images", items("train", train[1]),
                         items("test", test[1]), source)

# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare datasets for capnet.py (data/<name>/dataset.json).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, name):
        p.add_argument("--root", "--out", dest="root", default="data", help="output folder (default: data)")
        p.add_argument("--name", default=name, help=f"dataset name -> <root>/<name>/ (default: {name})")
        p.add_argument("--skip-bad-images", action="store_true", help="drop and count unreadable images")

    def make_split(p):
        p.add_argument("--make-split", action="store_true",
                       help="draw our own long-tailed subset (NOT the official split)")
        p.add_argument("--seed", type=int, default=0, help="seed of --make-split")
        p.add_argument("--alpha", type=float, default=None, help="Pareto shape (default: fitted per dataset)")

    p = sub.add_parser("synthetic-lt", help="the embedded synthetic long-tailed world and its small CLIP")
    p.add_argument("--root", "--out", dest="root", default="data", help="output folder (default: data)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("voc-lt", help="VOC-LT from VOCdevkit (VOC2012 trainval + VOC2007 test)")
    p.add_argument("--voc-root", required=True, help="folder holding VOCdevkit/VOC2012 and VOCdevkit/VOC2007")
    p.add_argument("--split", help="official VOC-LT img_id.txt")
    common(p, "voc-lt"), make_split(p)
    p = sub.add_parser("coco-lt", help="COCO-LT from COCO 2017 (train2017 subset + val2017)")
    p.add_argument("--coco-root", required=True, help="folder holding annotations/, train2017/, val2017/")
    p.add_argument("--split", help="official COCO-LT img_id.pkl (plain text ids)")
    common(p, "coco-lt"), make_split(p)
    p = sub.add_parser("nus-wide-lt", help="NUS-WIDE-LT: 81 concepts, seeded long-tailed train subset")
    p.add_argument("--nus-root", required=True, help="folder with Concepts81.txt, ImageList/, Groundtruth/")
    p.add_argument("--image-root", help="folder of the Flickr images (default: <nus-root>/Flickr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=None, help="Pareto shape (default: fitted per dataset)")
    common(p, "nus-wide-lt")
    p = sub.add_parser("lists", help='list files: "relative/path label label ..." per line')
    for flag in ("--train", "--test", "--classes", "--image-root", "--name"):
        p.add_argument(flag, required=True)
    p.add_argument("--root", "--out", dest="root", default="data", help="output folder (default: data)")
    p.add_argument("--skip-bad-images", action="store_true", help="drop and count unreadable images")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "synthetic-lt":
            make_synthetic_lt(root=args.root, seed=args.seed)
        elif args.cmd == "voc-lt":
            prepare_voc_lt(args.voc_root, args.split, args.root, args.make_split, args.seed,
                           args.skip_bad_images, args.name, args.alpha)
        elif args.cmd == "coco-lt":
            prepare_coco_lt(args.coco_root, args.split, args.root, args.make_split, args.seed,
                            args.skip_bad_images, args.name, args.alpha)
        elif args.cmd == "nus-wide-lt":
            prepare_nus_wide_lt(args.nus_root, args.image_root, args.root, args.seed,
                                args.skip_bad_images, args.name, args.alpha)
        else:
            prepare_lists(args.train, args.test, args.classes, args.image_root, args.name,
                          args.root, args.skip_bad_images)
    except (OSError, ValueError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"data_prep.py {args.cmd}: error: {e}")

if __name__ == "__main__":
    main()

"""
Data preparation for CAPNet: raw VOC / COCO / NUS-WIDE releases and list files to the
prepared format `data/<name>/dataset.json` (SPEC section 5), and the embedded synthetic
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
import os
import sys
from pathlib import Path

import numpy as np

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
    d = {"name": name, "classes": list(classes), "image_root": str(Path(image_root).resolve()),
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

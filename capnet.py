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
    ckpt_every: int = 0               # extra checkpoint every this many steps (0: end of each epoch only)


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
    "graph": ("text", "cooccur", "identity"), "loss": ("db-focal", "bce", "focal"),
    "peft": ("adaptformer", "none"), "tte": (1, 5, 10), "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "none"), "backend": ("auto", "ext", "torch"),
}
# fields that may change between a run and its --resume without changing any number
RESUME_FREE = {"resume", "workers", "log_every", "device", "eval_batch_size", "compile", "seeds"}
# fields that name an ablation: a non-default value goes into the derived run name
ABLATION_FIELDS = ("graph", "loss", "peft", "tau_prime", "tte", "n_ctx", "s", "p", "ctx_init")


class RunError(RuntimeError):
    """A user-facing failure with a message that says what to do (printed without a traceback)."""


def preset_config(data: str) -> Config:
    # an unknown name is a custom dataset prepared with `data_prep.py lists`: a real dataset
    return Config(**PRESETS.get(data, dict(clip="ViT-B/16")), data=data)


def run_name(cfg: Config) -> str:
    base = preset_config(cfg.data)
    parts = [cfg.data]
    clip = cfg.clip
    if clip and clip != base.clip and Path(clip).name != "clip.pt":
        parts.append((Path(clip).stem if clip not in KNOWN_MODELS else clip).replace("/", "-").replace("@", "-"))
    for key in ABLATION_FIELDS:
        value = getattr(cfg, key)
        if value != getattr(base, key):
            parts.append(f"{key.replace('_', '-')}-{value}".replace(" ", "_"))
    return "-".join(parts)


def resolve_config(cfg: Config) -> Config:
    """Check every choice and fill the "" defaults that depend on other fields."""
    cfg = dataclasses.replace(cfg)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: expected one of "
                             f"{', '.join(map(str, allowed))}")
    for key in ("epochs", "batch_size", "eval_batch_size", "input_size", "n_ctx"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    for key in ("workers", "adapter_dim", "ckpt_every", "seed", "log_every"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must not be negative, got {getattr(cfg, key)}")
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
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions() -> dict:
    import platform
    import PIL
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "cuda": torch.version.cuda, "capnet_ext": bool(EXT_AVAILABLE),
            "platform": platform.platform()}


def make_logger(path: Path | None):
    """print, and append to log.txt (rank 0 only: other ranks pass path=None and stay quiet)."""
    def log(msg: str = ""):
        if path is None:
            return
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def format_config(cfg: Config) -> str:
    items = [f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
    width = max(len(s) for s in items) + 2
    per_row = max(1, 100 // width)
    rows = [items[i:i + per_row] for i in range(0, len(items), per_row)]
    return "\n".join("  " + "".join(s.ljust(width) for s in row).rstrip() for row in rows)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """The global batches of one epoch (drop_last), each cut to this process's shard.

    The order depends only on (seed, epoch): a resumed run and every DDP process see the same
    batches, and `batch_size` is the global batch, so 2 processes x 32 = 1 process x 64.
    The extra words keep this stream apart from the dataset's augmentation RNG [seed, epoch, index].
    """
    order = np.random.default_rng([seed, epoch, 2**32 - 1, 1]).permutation(num_items)
    steps = num_items // batch_size
    return [order[i * batch_size:(i + 1) * batch_size][rank::world].tolist() for i in range(steps)]


# ---- data and backbone

def load_dataset(cfg: Config, rank: int = 0, world: int = 1, prepare: bool = True) -> "Prepared":
    path = Path(cfg.data_root) / cfg.data / "dataset.json"
    if not path.exists() and cfg.data == "synthetic-lt" and prepare:
        # the embedded default is made on first use (deterministic, a few minutes on 2 CPU cores)
        if rank == 0:
            print(f"{path} not found: preparing synthetic-lt (python data_prep.py synthetic-lt)", flush=True)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import data_prep
            data_prep.make_synthetic_lt(root=cfg.data_root, seed=0)
        barrier(world)
    if not path.exists():
        command = DATA_PREP_COMMANDS.get(
            cfg.data, f"python data_prep.py lists --train F --test F --classes F --image-root DIR --name {cfg.data}")
        raise RunError(f"dataset {cfg.data!r} is not prepared: {path} does not exist.\n"
                       f"Prepare it with:\n  {command}\n(see README.md, 'Reproduce').")
    return load_prepared(path)


def load_backbone(cfg: Config):
    """The frozen CLIP named by cfg.clip. A real dataset never falls back to a toy model."""
    if cfg.clip not in KNOWN_MODELS and not Path(cfg.clip).exists():
        raise RunError(f"CLIP weights {cfg.clip!r} not found: pass a known model name "
                       f"({', '.join(KNOWN_MODELS)}) or the path of a checkpoint file.")
    return load_clip(cfg.clip, device="cpu")


def check_checkpoint(ckpt: dict, data: str, classes: list, clip_source: dict, where: str):
    """A checkpoint only fits the dataset, class list and backbone it was trained with."""
    if ckpt["config"]["data"] != data:
        raise RunError(f"{where}: checkpoint was trained on dataset {ckpt['config']['data']!r}, not {data!r}")
    if list(ckpt["classes"]) != list(classes):
        old, new = list(ckpt["classes"]), list(classes)
        diff = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(old, new)) if a != b][:3]
        raise RunError(f"{where}: class list differs from the checkpoint's ({len(old)} classes in the "
                       f"checkpoint, {len(new)} now; {'; '.join(diff) or 'one list extends the other'})")
    if ckpt["clip"].get("sha256") != clip_source.get("sha256"):
        raise RunError(f"{where}: backbone differs: checkpoint was trained with CLIP {ckpt['clip'].get('name')!r} "
                       f"(sha256 {str(ckpt['clip'].get('sha256'))[:12]}), now {clip_source.get('name')!r} "
                       f"(sha256 {str(clip_source.get('sha256'))[:12]})")


# ---- checkpoints: trainable parameters + optimizer + scheduler + RNG, written atomically

CHECKPOINT_FORMAT = "capnet-checkpoint-1"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy arrays are not allowed by weights_only loading: store the MT19937 keys as a tensor
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    s = state["numpy"]
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def save_checkpoint(path: Path, payload: dict):
    """Temporary file, fsync, rename: a crash at any moment leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, unpickling refused ...
        raise RunError(f"checkpoint {path} is truncated or corrupted and cannot be read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a CAPNet checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    return ckpt


def config_from_checkpoint(ckpt: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(ckpt["config"]) - known)
    if unknown:
        raise RunError(f"checkpoint config has fields this capnet.py does not know: {', '.join(unknown)}")
    return Config(**ckpt["config"])


def trainable_state(model: nn.Module) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_model(clip, classes, cfg: Config, class_counts, train_targets, device):
    # the seed fixes every random init (prompts, adapters): a rebuilt model starts where training did
    torch.manual_seed(cfg.seed)
    return CAPNet(clip, classes, cfg, class_counts, train_targets).to(device)


def restore_model(ckpt: dict, clip, cfg: Config, device) -> nn.Module:
    """CAPNet exactly as trained: rebuilt from the checkpoint's classes, counts and labels, then its
    trained parameters loaded (the frozen CLIP comes from cfg.clip, checked by sha256 by the caller)."""
    model = build_model(clip, list(ckpt["classes"]), cfg, ckpt["class_counts"].numpy(),
                        ckpt["train_targets"].float().numpy(), device)
    load_trainable(model, ckpt["model"])
    return model


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
    trainable = [p for p in model.parameters() if p.requires_grad]
    no_decay = {id(p) for p in model.no_decay_parameters()}  # temperature, adapter scales
    groups = [{"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0}]
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
    """Logits averaged over test-time views (SPEC section 1 step 8)."""
    if images.dim() == 4:  # (B, 3, S, S): one view
        return forward(images).float()
    B, V = images.shape[:2]
    logits = forward(images.flatten(0, 1)).float()  # (B * V, C)
    return logits.view(B, V, -1).mean(1)  # (B, C)


@torch.no_grad()
def score_dataset(forward, dataset, cfg: Config, device, amp: bool, rank: int = 0, world: int = 1):
    """-> (scores (N, C), targets (N, C)) over the whole set; under DDP each process scores
    every world-th image and the pieces are gathered (in dataset order) on every process."""
    shard = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=max(1, cfg.eval_batch_size // max(1, cfg.tte)),
        num_workers=cfg.workers, collate_fn=collate_skip_bad if cfg.skip_bad_images else None,
        worker_init_fn=seed_worker)
    scores, targets, indices = [], [], []
    for batch in loader:
        if batch is None:
            continue
        images, target, index = batch
        with autocast(device, amp):
            scores.append(view_logits(forward, images.to(device)).cpu())  # (B, C)
        targets.append(target.float())
        indices.append(torch.as_tensor(index).view(-1))
    C = dataset.num_classes if hasattr(dataset, "num_classes") else None
    part = (torch.cat(scores) if scores else torch.zeros(0, C), torch.cat(targets) if targets else torch.zeros(0, C),
            torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long))
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
    from PIL import Image, ImageDraw, ImageFont
    W, H = 960, 600
    left, right, top, bottom = 90, 30, 60, 80
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=14)
    counts = [max(1, c["train_count"]) for c in per_class]
    lo = 10 ** math.floor(math.log10(min(counts)))
    hi = 10 ** math.ceil(math.log10(max(counts) + 1))
    lx0, lx1 = math.log10(lo), math.log10(hi)

    def x_of(n):  # log axis
        return left + (math.log10(max(1, n)) - lx0) / (lx1 - lx0) * (W - left - right)

    def y_of(ap):  # 0..100 percent
        return H - bottom - ap / 100.0 * (H - top - bottom)

    # tail / medium / head bands (SPEC: tail n < 20, medium 20 <= n < 100, head n >= 100)
    bands = [(lo, TAIL_MIN, (255, 236, 236), "tail"), (TAIL_MIN, HEAD_MIN, (255, 248, 225), "medium"),
             (HEAD_MIN, hi, (232, 244, 255), "head")]
    for a, b, colour, label in bands:
        a, b = max(a, lo), min(b, hi)
        if a < b:
            d.rectangle([x_of(a), top, x_of(b), H - bottom], fill=colour)
            d.text(((x_of(a) + x_of(b)) / 2, top + 6), label, fill=(90, 90, 90), font=small, anchor="mt")
    for ap in range(0, 101, 20):  # y grid and ticks
        d.line([left, y_of(ap), W - right, y_of(ap)], fill=(215, 215, 215))
        d.text((left - 8, y_of(ap)), str(ap), fill="black", font=small, anchor="rm")
    decade = lo
    while decade <= hi:  # x ticks at decades, minor ticks at 2..9
        d.line([x_of(decade), H - bottom, x_of(decade), H - bottom + 6], fill="black")
        d.text((x_of(decade), H - bottom + 10), f"{decade:g}", fill="black", font=small, anchor="mt")
        for m in range(2, 10):
            if decade * m < hi:
                d.line([x_of(decade * m), H - bottom, x_of(decade * m), H - bottom + 3], fill="black")
        decade *= 10
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((W / 2, H - 30), "training images per class (log scale)", fill="black", font=font, anchor="mm")
    d.text((20, (top + H - bottom) / 2), "AP (%)", fill="black", font=font, anchor="lm")
    d.text((W / 2, 25), title, fill="black", font=font, anchor="mm")
    zs_colour, tr_colour = (120, 120, 120), (220, 90, 20)
    for c in per_class:  # zero-shot beside trained, joined by a thin line
        if c["ap"] is None or c["ap_zero_shot"] is None:
            continue
        x = x_of(max(1, c["train_count"]))
        y0, y1 = y_of(c["ap_zero_shot"]), y_of(c["ap"])
        d.line([x - 4, y0, x + 4, y1], fill=(180, 180, 180))
        d.ellipse([x - 9, y0 - 5, x + 1, y0 + 5], outline=zs_colour, width=2)
        d.ellipse([x - 1, y1 - 5, x + 9, y1 + 5], fill=tr_colour)
    lx, ly = W - right - 190, H - bottom - 62  # legend, bottom right
    d.rectangle([lx, ly, lx + 180, ly + 54], fill="white", outline=(150, 150, 150))
    d.ellipse([lx + 10, ly + 10, lx + 20, ly + 20], outline=zs_colour, width=2)
    d.text((lx + 30, ly + 15), "zero-shot CLIP", fill="black", font=small, anchor="lm")
    d.ellipse([lx + 10, ly + 32, lx + 20, ly + 42], fill=tr_colour)
    d.text((lx + 30, ly + 37), "CAPNet (trained)", fill="black", font=small, anchor="lm")
    img.save(path)


def write_outputs(run_dir: Path, results: dict):
    write_atomic(run_dir / "results.json", json.dumps(to_jsonable(results), indent=2) + "\n")
    lines = ["name,train_count,group,ap_zero_shot,ap"]
    for c in results["per_class"]:
        fmt = lambda v: "" if v is None else f"{v:.4f}"
        lines.append(f"{json.dumps(c['name'])},{c['train_count']},{c['group']},{fmt(c['ap_zero_shot'])},{fmt(c['ap'])}")
    write_atomic(run_dir / "per_class_ap.csv", "\n".join(lines) + "\n")
    zs, tr = results["zero_shot"], results["trained"]
    plot_ap_vs_freq(results["per_class"], run_dir / "ap_vs_freq.png",
                    f"{results['config']['data']}: mAP zero-shot {zs['total']:.1f} -> trained {tr['total']:.1f}")


def per_class_rows(classes, counts, ap_zero_shot, ap) -> list:
    nan_to_none = lambda v: None if math.isnan(float(v)) else float(v)
    return [{"name": name, "train_count": int(counts[i]), "group": class_group(int(counts[i])),
             "ap_zero_shot": nan_to_none(ap_zero_shot[i]), "ap": nan_to_none(ap[i])}
            for i, name in enumerate(classes)]


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
    log = make_logger(run_dir / "log.txt" if rank == 0 else None)
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

    mode = "resuming at step %d" % ckpt["step"] if ckpt else "new run"
    log(f"CAPNet train: {run_dir} ({mode}), {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log("config:\n" + format_config(cfg))
    if rank == 0:
        write_atomic(run_dir / "config.json", json.dumps(to_jsonable(dataclasses.asdict(cfg)), indent=2) + "\n")
    log(f"dataset {prepared.name}: {len(prepared.train)} train / {len(prepared.test)} test images")
    log(format_class_stats(classes, counts))
    backend = cfg.backend if cfg.backend != "auto" else ("ext" if EXT_AVAILABLE else "torch")
    log(f"fused ops: {'capnet_ext extension' if backend == 'ext' else 'pure torch reference'}"
        + ("" if EXT_AVAILABLE else " (extension not built: python setup.py build_ext --inplace)"))
    log(f"device {device}, {'bf16 autocast' if amp else 'fp32'}, {world} process(es)"
        + (f", DDP {'nccl' if device.type == 'cuda' else 'gloo'}" if world > 1 else ""))
    log(f"CLIP {clip.source['name']} (sha256 {clip.source['sha256'][:12]}), embed dim {clip.embed_dim}, "
        f"input {cfg.input_size}")

    test_set = MultiLabelDataset(prepared.test, prepared.image_root, C, cfg.input_size, mode="eval",
                                 n_views=cfg.tte, seed=cfg.seed, skip_bad=cfg.skip_bad_images)
    if ckpt is not None:
        ap_zero_shot = ckpt["zero_shot_ap"]
    else:  # step 0: plain CLIP, same TTE, before any training
        t0 = time.time()
        scores, targets = score_dataset(zero_shot_forward(clip, classes), test_set, cfg, device, amp, rank, world)
        ap_zero_shot = average_precision(scores, targets)
        log(f"zero-shot mAP (step 0, tte {cfg.tte}): " + format_map(summarize(ap_zero_shot, counts))
            + f"  [{time.time() - t0:.1f}s]")

    model = build_model(clip, classes, cfg, counts, train_targets, device)
    parts = {k: sum(p.numel() for p in v) for k, v in model.trainable_parts().items()}
    log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in parts.items())
        + f" (total {sum(parts.values()):,}; CLIP frozen: {sum(p.numel() for p in clip.parameters() if not p.requires_grad):,})")

    train_set = MultiLabelDataset(prepared.train, prepared.image_root, C, cfg.input_size, mode="train",
                                  scale_min=cfg.scale_min, seed=cfg.seed, skip_bad=cfg.skip_bad_images)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    total_steps = cfg.epochs * steps_per_epoch
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
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)

    def checkpoint(step: int):
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(),
                "config": dataclasses.asdict(cfg), "classes": list(classes), "clip": dict(clip.source),
                "class_counts": torch.as_tensor(counts, dtype=torch.int64),
                "train_targets": torch.as_tensor(train_targets).bool(), "zero_shot_ap": ap_zero_shot,
                "wall_seconds": wall_before + time.time() - start, "versions": versions()})
        barrier(world)

    log(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch {cfg.batch_size}, "
        f"SGD lr {cfg.lr} momentum {cfg.momentum} wd {cfg.weight_decay}, cosine, warm-up {cfg.warmup_epochs} epoch(s)")
    model.train()
    t_window, s_window = time.time(), step
    while step < total_steps:
        epoch = step // steps_per_epoch
        train_set.set_epoch(epoch)
        batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, rank, world)
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=batches[step - epoch * steps_per_epoch:], num_workers=cfg.workers,
            collate_fn=collate_skip_bad if cfg.skip_bad_images else None, worker_init_fn=seed_worker,
            pin_memory=device.type == "cuda")
        for batch in loader:
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
    scores, targets = score_dataset(model, test_set, cfg, device, amp, rank, world)
    ap = average_precision(scores, targets)
    results = {"zero_shot": summarize(ap_zero_shot, counts), "trained": summarize(ap, counts),
               "per_class": per_class_rows(classes, counts, ap_zero_shot, ap), "config": dataclasses.asdict(cfg),
               "seed": cfg.seed, "versions": versions(), "steps": total_steps, "world_size": world,
               "backend": backend, "dataset": {"name": prepared.name, "train_images": len(prepared.train),
                                               "test_images": len(prepared.test), "source": prepared.source},
               "clip": dict(clip.source), "wall_seconds": wall_before + time.time() - start}
    log(f"trained mAP (tte {cfg.tte}):  " + format_map(results["trained"]) + f"  [{time.time() - t0:.1f}s]")
    log(f"zero-shot mAP (tte {cfg.tte}): " + format_map(results["zero_shot"]))
    if rank == 0:
        write_outputs(run_dir, results)
        log(f"wrote {run_dir}/: config.json log.txt checkpoint.pt results.json per_class_ap.csv ap_vs_freq.png "
            f"({format_duration(results['wall_seconds'])})")
    barrier(world)
    return results


def format_map(m: dict) -> str:
    f = lambda v: "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"
    return f"total {f(m['total'])} | head {f(m['head'])} | medium {f(m['medium'])} | tail {f(m['tail'])}"


def train_seeds(cfg: Config) -> dict:
    """--seeds 0,1,2: one run per seed under runs/<name>/seed<k>/, then mean and std (n - 1)."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    runs = [train(dataclasses.replace(cfg, seed=s, seeds="", name=f"{cfg.name}/seed{s}")) for s in seeds]
    summary = {"seeds": seeds, "runs": [f"{cfg.out_dir}/{cfg.name}/seed{s}" for s in seeds]}
    for kind in ("zero_shot", "trained"):
        summary[kind] = {}
        for group in ("total", "head", "medium", "tail"):
            values = np.array([r[kind][group] for r in runs], dtype=np.float64)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[kind][group] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    if int(os.environ.get("RANK", "0")) == 0:
        write_atomic(Path(cfg.out_dir) / cfg.name / "seeds.json", json.dumps(to_jsonable(summary), indent=2) + "\n")
        print(f"\n{len(seeds)} seeds ({cfg.seeds}): mean +- std mAP")
        for kind in ("zero_shot", "trained"):
            print(f"  {kind:9s} " + " | ".join(f"{g} {summary[kind][g]['mean']:.2f} +- {summary[kind][g]['std']:.2f}"
                                             for g in ("total", "head", "medium", "tail")))
    return summary


# -----------------------------------------------------------------------------
# eval and predict

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def latest_checkpoint(out_dir: str = "runs") -> Path:
    found = sorted(Path(out_dir).glob("**/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunError(f"no checkpoint under {out_dir}/: train first (python capnet.py train) or pass --ckpt")
    return found[-1]


def load_for_inference(ckpt_path, device: str = "auto", tte: int | None = None):
    """-> (model in eval mode, cfg, ckpt, device): everything rebuilt from the checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt)
    cfg = dataclasses.replace(cfg, device=device, resume=False, tte=tte if tte is not None else cfg.tte)
    cfg = resolve_config(cfg)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    clip = load_backbone(cfg).to(dev)
    check_checkpoint(ckpt, cfg.data, ckpt["classes"], clip.source, f"checkpoint {ckpt_path}")
    model = restore_model(ckpt, clip, cfg, dev).eval()
    return model, cfg, ckpt, dev


def evaluate(ckpt_path=None, tte: int | None = None, device: str = "auto", out_dir: str = "runs",
             workers: int | None = None) -> dict:
    """`capnet.py eval`: model, preprocessing and class list from the checkpoint -> mAP dict (percent)."""
    ckpt_path = Path(ckpt_path) if ckpt_path else latest_checkpoint(out_dir)
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte)
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    prepared = load_dataset(cfg, prepare=False)
    check_checkpoint(ckpt, cfg.data, prepared.classes, ckpt["clip"], f"checkpoint {ckpt_path} vs {cfg.data_root}/{cfg.data}")
    counts = ckpt["class_counts"].numpy()
    if not np.array_equal(counts, class_counts(prepared.train, len(prepared.classes))):
        raise RunError(f"checkpoint {ckpt_path}: the training set of {cfg.data_root}/{cfg.data} changed since "
                       f"training (class counts differ), so head/medium/tail would not match")
    test_set = MultiLabelDataset(prepared.test, prepared.image_root, len(prepared.classes), cfg.input_size,
                                 mode="eval", n_views=cfg.tte, seed=cfg.seed, skip_bad=cfg.skip_bad_images)
    t0 = time.time()
    scores, targets = score_dataset(model, test_set, cfg, dev, use_bf16(cfg, dev))
    result = summarize(average_precision(scores, targets), counts)
    print(f"{ckpt_path} (step {ckpt['step']}), {cfg.data} test ({len(test_set)} images), tte {cfg.tte}: "
          f"{time.time() - t0:.1f}s")
    print("mAP " + format_map(result))
    return result


def image_files(paths) -> list:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise RunError(f"no such image or folder: {p}")
    if not files:
        raise RunError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    return files


@torch.no_grad()
def predict(ckpt_path, paths, threshold: float = 0.5, top_k: int = 5, tte: int | None = None,
            device: str = "auto", as_json: bool = False) -> list:
    """`capnet.py predict`: per image, the labels with probability >= threshold (at most top_k, best first)."""
    if not 0.0 <= threshold <= 1.0:
        raise RunError(f"--threshold must lie in [0, 1], got {threshold}")
    if top_k < 1:
        raise RunError(f"--top-k must be at least 1, got {top_k}")
    model, cfg, ckpt, dev = load_for_inference(ckpt_path, device, tte)
    classes, amp = list(ckpt["classes"]), use_bf16(cfg, dev)
    rows = []
    for f in image_files(paths):
        views = tte_views(load_rgb(f), cfg.input_size, cfg.tte)  # (V, 3, S, S)
        with autocast(dev, amp):
            logits = view_logits(model, views.unsqueeze(0).to(dev))[0]  # (C,)
        probs = torch.sigmoid(logits).cpu()  # (C,)
        best = torch.argsort(probs, descending=True).tolist()
        labels = [{"name": classes[i], "prob": round(float(probs[i]), 4)} for i in best[:top_k]
                  if probs[i] >= threshold]
        rows.append({"image": str(f), "labels": labels,
                     "best": {"name": classes[best[0]], "prob": round(float(probs[best[0]]), 4)}})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        width = min(60, max(len(r["image"]) for r in rows) + 2)
        print(f"{'image'.ljust(width)}labels with probability >= {threshold:.2f} (top {top_k})")
        for r in rows:
            shown = ", ".join(f"{l['name']} {l['prob']:.2f}" for l in r["labels"])
            shown = shown or f"(none; best: {r['best']['name']} {r['best']['prob']:.2f})"
            print(f"{r['image'].ljust(width)}{shown}")
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
    cache = Path("~/.cache/clip").expanduser()
    print(f"CLIP models (download cache {cache}):")
    for name, url in KNOWN_MODELS.items():
        path = cache / os.path.basename(url)
        print(f"  {name:16s} {'present' if path.exists() else 'absent '}  {path}")
    prepared = sorted(Path("data").glob("*/dataset.json"))
    print("prepared datasets: " + (", ".join(p.parent.name for p in prepared) if prepared else "none under data/"))


# -----------------------------------------------------------------------------
# bench

# -----------------------------------------------------------------------------
# CLI

def parse_bool(text: str) -> bool:
    import argparse
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_flags(parser):
    """One strict --key value flag per Config field (underscores become dashes); bools also as bare flags."""
    kinds = {"int": int, "float": float, "str": str, "bool": parse_bool}
    for f in dataclasses.fields(Config):
        kind = kinds[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = "--" + f.name.replace("_", "-")
        if kind is parse_bool:
            parser.add_argument(flag, type=kind, nargs="?", const=True, default=None, metavar="true|false")
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=f.type.upper() if kind is not str else "TEXT")


def config_from_args(args) -> Config:
    """Preset of --data, then every flag given on the command line."""
    cfg = preset_config(args.data or Config.data)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **given)


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="capnet.py", allow_abbrev=False,
                                     description="CAPNet: CLIP prompts + label-graph GCN for long-tailed multi-label recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", allow_abbrev=False, help="train (default: the embedded synthetic-lt)")
    add_config_flags(p)
    p = sub.add_parser("eval", allow_abbrev=False, help="evaluate a checkpoint on its dataset's test set")
    p.add_argument("--ckpt", default=None, help="default: the latest runs/**/checkpoint.pt")
    p.add_argument("--tte", type=int, choices=(1, 5, 10), default=None, help="test-time views (default: the run's)")
    p.add_argument("--device", choices=CHOICES["device"], default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out-dir", default="runs")
    p = sub.add_parser("predict", allow_abbrev=False, help="labels and probabilities for your own images")
    p.add_argument("--ckpt", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--tte", type=int, choices=(1, 5, 10), default=None)
    p.add_argument("--device", choices=CHOICES["device"], default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("bench", allow_abbrev=False, help="measured speed-ups of the fast paths")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, metavar="FILE")
    sub.add_parser("info", help="versions, device, extension, CLIP models present")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(config_from_args(args))
        if args.command == "eval":
            return evaluate(args.ckpt, args.tte, args.device, args.out_dir, args.workers)
        if args.command == "predict":
            return predict(args.ckpt, args.images, args.threshold, args.top_k, args.tte, args.device, args.json)
        if args.command == "bench":
            return bench(quick=args.quick, json_path=args.json)
        return info()
    except (RunError, ValueError, FileNotFoundError) as e:
        # user errors: the message says what to do; CAPNET_DEBUG=1 shows the traceback
        if os.environ.get("CAPNET_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""CAPNet test suite: `python -m pytest -q test_capnet.py`."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capnet  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# -----------------------------------------------------------------------------
# tokenizer, CLIP, loading, transforms

import importlib.util


def _openai_module(name):
    """OpenAI's reference code from the clip-anytorch package, loaded by file path (its package
    __init__ needs torchvision). Test-only oracle; the test is skipped where it is absent."""
    for base in sys.path:
        path = Path(base or ".") / "clip" / f"{name}.py"
        if path.is_file() and (path.parent / "bpe_simple_vocab_16e6.txt.gz").is_file():
            spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    pytest.skip("clip-anytorch (OpenAI's reference CLIP) is not installed")


# reduced sizes with OpenAI's key layout; widths are multiples of 64 (OpenAI's 64-dim heads)
SMALL_RN = dict(embed_dim=64, image_resolution=96, vision_layers=(1, 2, 1, 1), vision_width=8,
                vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=128,
                transformer_heads=2, transformer_layers=2)
SMALL_VIT = dict(SMALL_RN, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8)
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)


def _random_clip(clip_cls, seed=0, **sizes):
    """A random-weight CLIP (fp32, eval): `clip_cls` initialises it, then BatchNorm affine
    parameters and running statistics are drawn too (OpenAI's init zeroes bn3, which would
    hide the residual branches from the comparison)."""
    torch.manual_seed(seed)
    model = clip_cls(**sizes).float().eval()
    for key, t in model.state_dict().items():  # state_dict tensors share storage with the model
        if ("bn" in key or "downsample.1" in key) and t.is_floating_point():
            if key.endswith(("weight", "running_var")):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0, 0.1)
    return model


def _random_clip_state_dict(clip_cls, seed=0, **sizes):
    return {k: v.clone() for k, v in _random_clip(clip_cls, seed, **sizes).state_dict().items()}


def _relerr(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def small_ckpts():
    """{'rn': state dict, 'vit': state dict} drawn with our own CLIP class (no oracle needed)."""
    return {"rn": _random_clip_state_dict(capnet.CLIP, seed=0, **SMALL_RN),
            "vit": _random_clip_state_dict(capnet.CLIP, seed=1, **SMALL_VIT)}


TEXTS = ["a photo of a dog.", "a photo of a traffic light, seen from the side of the road at night.", "x"]


def test_tokenize_known_ids():
    ids = capnet.tokenize("a photo of a dog.")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids[0, 8:].eq(0).all()
    assert capnet._tokenizer().decode(ids[0, 1:7].tolist()) == "a photo of a dog . "


def test_tokenizer_matches_openai():
    ref = _openai_module("simple_tokenizer").SimpleTokenizer()
    ours = capnet._tokenizer()
    texts = ["Hello, World!!", "it's a  photo\tof THE   café's 3 dogs &amp; 12 cats", "naïve Zürich 東京 🙂",
             "&lt;b&gt;bold&lt;/b&gt; don't we'll I'm", "mcdonald's, 1999-2024: $5.99", "<|startoftext|>x",
             "aaaaaaaaaaaaaaaa", "potted_plant tv_monitor"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))


def test_tokenize_overflow_and_truncate():
    long_text = " ".join(["dog"] * 100)
    with pytest.raises(RuntimeError, match="longer than the context length 77"):
        capnet.tokenize(long_text)
    ids = capnet.tokenize([long_text, "a cat"], truncate=True)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and ids[0, 1:-1].eq(1929).all()  # "dog"
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407]
    assert capnet.tokenize("a cat", context_length=4).tolist() == [[49406, 320, 2368, 49407]]


@pytest.mark.parametrize("family", ["rn", "vit"])
def test_build_clip_matches_openai(family):
    ref_model = _openai_module("model")
    sizes = SMALL_RN if family == "rn" else SMALL_VIT
    ref = _random_clip(ref_model.CLIP, seed=2, **sizes)
    sd = ref.state_dict()
    ours = capnet.build_clip(sd)
    assert set(ours.state_dict()) == set(sd)
    assert ours.embed_dim == 64 and ours.context_length == 77 and ours.vocab_size == 49408
    assert ours.visual.input_resolution == sizes["image_resolution"] and not ours.training
    torch.manual_seed(3)
    images = torch.randn(2, 3, sizes["image_resolution"], sizes["image_resolution"])
    tokens = capnet.tokenize(TEXTS)
    with torch.no_grad():
        assert _relerr(ours.encode_image(images), ref.encode_image(images)) <= 1e-5
        assert _relerr(ours.encode_text(tokens), ref.encode_text(tokens)) <= 1e-5
        assert _relerr(ours.encode_text(tokens, truncate=False), ref.encode_text(tokens)) <= 1e-5


def test_vit_b16_full_size_matches_openai():
    ref_model = _openai_module("model")
    ref = _random_clip(ref_model.CLIP, seed=4, **VIT_B16)
    ours = capnet.build_clip(ref.state_dict())
    assert ours.embed_dim == 512 and ours.visual.patch_size == 16 and len(ours.visual.transformer.resblocks) == 12
    assert ours.visual.transformer.resblocks[0].attn.n_head == 12 and ours.transformer.resblocks[0].attn.n_head == 8
    torch.manual_seed(5)
    image = torch.randn(1, 3, 224, 224)
    tokens = capnet.tokenize(TEXTS[:2])
    with torch.no_grad():
        assert _relerr(ours.encode_image(image), ref.encode_image(image)) <= 1e-5
        assert _relerr(ours.encode_text(tokens), ref.encode_text(tokens)) <= 1e-5


def test_truncated_text_equals_full_context(small_ckpts):
    clip = capnet.build_clip(small_ckpts["vit"])
    tokens = capnet.tokenize(["a dog", "a photo of a small brown dog on the grass."])
    with torch.no_grad():
        short, full = clip.encode_text(tokens), clip.encode_text(tokens, truncate=False)
        assert _relerr(short, full) <= 1e-6
        # the prompt learner's entry point: embeddings in, EOT positions given
        emb = clip.token_embedding(tokens)
        emb[:, 1] = torch.randn(2, emb.shape[-1])  # a "soft prompt" in place of one word
        eot = tokens.argmax(-1)
        a = clip.encode_text_embeddings(emb, eot)
        b = clip.encode_text_embeddings(emb, eot, truncate=False)
        assert _relerr(a, b) <= 1e-6 and _relerr(a, short) > 1e-3


def test_build_clip_rejects_wrong_state_dicts(small_ckpts):
    sd = dict(small_ckpts["rn"])
    with pytest.raises(KeyError, match="text_projection"):
        capnet.build_clip({k: v for k, v in sd.items() if k != "text_projection"})
    with pytest.raises(RuntimeError, match="surplus"):
        capnet.build_clip({**sd, "surplus.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="visual.attnpool.c_proj.bias"):
        capnet.build_clip({k: v for k, v in sd.items() if k != "visual.attnpool.c_proj.bias"})
    # OpenAI's archives carry these ints beside the tensors; they are not parameters
    extra = {"input_resolution": torch.tensor(96), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    assert capnet.build_clip({**sd, **extra}).embed_dim == 64

def _script_archive(sd, path):
    """Write `sd` as a TorchScript archive, like OpenAI's released .pt files: a ScriptModule whose
    state_dict holds OpenAI's key names."""
    root = torch.nn.Module()
    for key, tensor in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, tensor.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def _same_weights(model, sd):
    got = model.state_dict()
    return all(torch.equal(got[k], v.float() if v.is_floating_point() else v) for k, v in sd.items())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated; OpenAI ships it
def test_load_clip_torchscript_and_state_dict(small_ckpts, tmp_path):
    import hashlib
    sd = small_ckpts["rn"]
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # OpenAI ships fp16
    _script_archive({**half, "input_resolution": torch.tensor(96)}, tmp_path / "RN.pt")
    torch.save(sd, tmp_path / "plain.pt")
    jit = capnet.load_clip(tmp_path / "RN.pt")
    plain = capnet.load_clip(str(tmp_path / "plain.pt"))
    assert jit.dtype == torch.float32 and _same_weights(jit, half) and _same_weights(plain, sd)
    for model, file in ((jit, "RN.pt"), (plain, "plain.pt")):
        digest = hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()
        assert model.source == {"name": str(tmp_path / file), "sha256": digest}


def test_load_clip_bad_files(small_ckpts, tmp_path):
    torch.save(small_ckpts["vit"], tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    corrupted = bytearray(data)
    corrupted[-300:] = bytes(300)  # the zip's central directory
    (tmp_path / "corrupted.pt").write_bytes(bytes(corrupted))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("truncated.pt", "corrupted.pt", "text.pt"):
        with pytest.raises(RuntimeError, match=f"cannot read CLIP checkpoint .*{name}"):
            capnet.load_clip(tmp_path / name)
    torch.save({"weights": [1, 2]}, tmp_path / "notsd.pt")
    with pytest.raises(RuntimeError, match="notsd.pt"):
        capnet.load_clip(tmp_path / "notsd.pt")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="cannot build CLIP from .*other.pt.*not a CLIP state dict"):
        capnet.load_clip(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):
        capnet.load_clip(tmp_path / "missing.pt")


def test_known_models_carry_their_sha256():
    assert capnet.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32",
                                         "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for url in capnet.KNOWN_MODELS.values():
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert len(url.split("/")[-2]) == 64 and url.endswith(".pt")
    assert capnet.KNOWN_MODELS["ViT-B/16"].split("/")[-2].startswith("5806e77c")
    assert capnet.clip_cache_dir() == Path.home() / ".cache" / "clip"
    assert capnet.clip_cache_dir("~/elsewhere") == Path.home() / "elsewhere"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_clip_download_verify_and_cache(small_ckpts, tmp_path, monkeypatch):
    """A known name is fetched into the cache through a temporary file that only becomes the
    cache entry when its SHA-256 matches. `_fetch` is replaced by a local server (no network)."""
    import hashlib
    good = tmp_path / "served.pt"
    _script_archive(small_ckpts["rn"], good)
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    monkeypatch.setitem(capnet.KNOWN_MODELS, "RN50", f"https://example.invalid/{sha}/RN50.pt")
    served = {"bytes": good.read_bytes()[:1000], "calls": 0}

    def fake_fetch(url, dst):
        served["calls"] += 1
        assert Path(dst.name).parent == cache and Path(dst.name).name != "RN50.pt"  # never the final name
        dst.write(served["bytes"])
    monkeypatch.setattr(capnet, "_fetch", fake_fetch)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=f"SHA-256 .* expected {sha}"):  # a partial download
        capnet.load_clip("RN50", download_root=cache)
    assert list(cache.iterdir()) == []  # no partial file left behind
    served["bytes"] = good.read_bytes()
    model = capnet.load_clip("RN50", download_root=cache)
    assert model.source == {"name": "RN50", "sha256": sha} and _same_weights(model, small_ckpts["rn"])
    assert [p.name for p in cache.iterdir()] == ["RN50.pt"] and served["calls"] == 2
    capnet.load_clip("RN50", download_root=cache)  # cached and verified: no new download
    assert served["calls"] == 2
    (cache / "RN50.pt").write_bytes(b"damaged")  # a damaged cache entry is fetched again
    capnet.load_clip("RN50", download_root=cache)
    assert served["calls"] == 3 and (cache / "RN50.pt").read_bytes() == good.read_bytes()


def test_load_clip_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, dst):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(capnet, "_fetch", offline)
    with pytest.raises(RuntimeError) as e:
        capnet.load_clip("ViT-B/16", download_root=tmp_path / "c")
    msg = str(e.value)
    assert str(tmp_path / "c" / "ViT-B-16.pt") in msg and capnet.KNOWN_MODELS["ViT-B/16"] in msg
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in msg
    assert list((tmp_path / "c").iterdir()) == []

def _image(w, h, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalise(arr):  # (H, W, 3) uint8 -> (3, H, W), written out independently of capnet
    x = arr.astype(np.float32) / 255.0
    x = (x - np.array(capnet.CLIP_MEAN, np.float32)) / np.array(capnet.CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


def test_preprocess_by_hand():
    from PIL import Image
    # landscape 40x30 -> short side 24: 32x24 bicubic, centre crop columns 4..28
    img = _image(40, 30)
    resized = np.asarray(img.resize((32, 24), Image.BICUBIC))
    assert torch.allclose(capnet.preprocess(img, 24), _normalise(resized[:, 4:28]), atol=1e-6)
    # portrait 20x45 at 20: no resize; (45 - 20) / 2 = 12.5 rounds half-to-even (torchvision) -> rows 12..32
    img = _image(20, 45, seed=1)
    out = capnet.preprocess(img, 20)
    assert out.shape == (3, 20, 20) and torch.allclose(out, _normalise(np.asarray(img)[12:32]), atol=1e-6)
    # mode "L" and RGBA inputs become RGB
    assert capnet.preprocess(img.convert("L"), 20).shape == (3, 20, 20)
    assert torch.allclose(capnet.preprocess(img.convert("RGBA"), 20), out)


def test_train_augment_deterministic_and_flips():
    from PIL import Image
    img = _image(64, 48)
    a = capnet.train_augment(img, 32, np.random.default_rng([0, 1, 2]))
    b = capnet.train_augment(img, 32, np.random.default_rng([0, 1, 2]))
    c = capnet.train_augment(img, 32, np.random.default_rng([0, 2, 2]))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    grey = Image.new("RGB", (50, 70), (128, 64, 32))  # any crop of a flat image is that colour
    out = capnet.train_augment(grey, 16, np.random.default_rng(0))
    assert torch.allclose(out, _normalise(np.full((16, 16, 3), (128, 64, 32), np.uint8)), atol=1e-6)
    halves = np.zeros((40, 40, 3), np.uint8)
    halves[:, :20, 0] = 255  # left half red
    flipped = [capnet.train_augment(Image.fromarray(halves), 8, np.random.default_rng(s), scale=(1.0, 1.0))[0, 0, 0] < 0
               for s in range(20)]  # whole image kept: red (> 0 after normalising) at left unless flipped
    assert 3 <= sum(flipped) <= 17


def test_tte_views():
    from PIL import Image
    img = _image(300, 250)
    big = np.asarray(img.resize((297, 248), Image.BICUBIC))  # short side 250 -> 248, long int(248 * 300 / 250)
    five = capnet.tte_views(img, 224, 5)
    assert five.shape == (5, 3, 224, 224)
    expected = [big[:224, :224], big[:224, -224:], big[-224:, :224], big[-224:, -224:], big[12:236, 36:260]]
    for view, crop in zip(five, expected):
        assert torch.allclose(view, _normalise(crop), atol=1e-6)
    ten = capnet.tte_views(img, 224, 10)
    assert torch.equal(ten[:5], five) and torch.equal(ten[5:], five.flip(-1))
    assert torch.equal(capnet.tte_views(img, 224, 1), five[4:])
    with pytest.raises(ValueError, match="n_views"):
        capnet.tte_views(img, 224, 3)


def test_load_rgb_errors_name_the_file(tmp_path):
    img = _image(30, 20).convert("L")
    img.save(tmp_path / "grey.png")
    assert capnet.load_rgb(tmp_path / "grey.png").mode == "RGB"
    _image(64, 64).save(tmp_path / "photo.jpg", quality=90)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("hello")
    for name in ("missing.jpg", "cut.jpg", "notes.jpg"):
        with pytest.raises(OSError, match=f"cannot read image .*{name}"):
            capnet.load_rgb(tmp_path / name)


def test_resize_pos_embed():
    pos = torch.randn(1 + 4 * 4, 8)
    assert capnet.resize_pos_embed(pos, (4, 4)) is pos  # native size: the checkpoint's own embedding
    ramp = torch.zeros(1 + 4 * 4, 8)
    ramp[0] = 7.0
    ramp[1:] = torch.arange(4.0).repeat(4)[:, None]  # value = column index, row-major grid
    out = capnet.resize_pos_embed(ramp, (3, 8))
    assert out.shape == (1 + 24, 8) and torch.equal(out[0], ramp[0])
    grid = out[1:, 0].view(3, 8)
    assert torch.allclose(grid, grid[:1].expand(3, 8)) and (grid[0, 1:] >= grid[0, :-1]).all()  # varies along width only
    flat = capnet.resize_pos_embed(torch.full((1 + 9, 4), 0.5), (6, 6))
    assert torch.allclose(flat, torch.full_like(flat, 0.5))  # bicubic keeps a constant


@pytest.mark.parametrize("family,key", [("vit", "visual.positional_embedding"),
                                        ("rn", "visual.attnpool.positional_embedding")])
def test_encode_image_at_another_size(small_ckpts, family, key):
    """At twice the native size (like 224 -> 448) the tower runs with its positional embedding
    resized; the result equals a model whose checkpoint holds that resized embedding natively."""
    sd = small_ckpts[family]
    clip = capnet.build_clip(sd)
    native = clip.visual.input_resolution
    size = 2 * native
    g = round((sd[key].shape[0] - 1) ** 0.5)
    big = capnet.build_clip({**sd, key: capnet.resize_pos_embed(sd[key], (2 * g, 2 * g))})
    assert big.visual.input_resolution == size
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = clip.encode_image(images)
        assert out.shape == (2, clip.embed_dim) and torch.isfinite(out).all()
        assert _relerr(out, big.encode_image(images)) <= 1e-6

# -----------------------------------------------------------------------------
# model, graph, GCN, prompts, losses, metrics

# -----------------------------------------------------------------------------
# fused ops and the extension

# -----------------------------------------------------------------------------
# data preparation and datasets

import io
import json
import pickle

import data_prep  # noqa: E402


def _jpeg_bytes(color=(200, 30, 30)):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def _write_images(root, relpaths):
    for rel in relpaths:
        p = Path(root) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(JPEG)


def _write_json(path, d):
    Path(path).write_text(json.dumps(d))
    return path


def _dataset_dict(**over):
    d = {"name": "toy", "classes": ["cat", "dog", "traffic light"], "image_root": "images",
         "train": [["a.jpg", [0, 2]], ["b.jpg", [1]]], "test": [["c.jpg", [0]], ["d.jpg", []]], "source": {}}
    d.update(over)
    return d


def test_class_group_boundaries():
    assert [capnet.class_group(n) for n in (1000, 100, 99, 20, 19, 1)] == \
        ["head", "head", "medium", "medium", "tail", "tail"]


def test_multihot_counts_and_stats():
    items = [("a", [0, 2]), ("b", [2]), ("c", [])]
    y = capnet.multihot(items, 3)
    assert y.dtype == np.float32 and y.tolist() == [[1, 0, 1], [0, 0, 1], [0, 0, 0]]
    counts = capnet.class_counts(items * 50, 3)
    assert counts.tolist() == [50, 0, 100]
    text = capnet.format_class_stats(["cat", "dog", "bird"], np.array([150, 20, 3]), num_images=170)
    assert "images: 170" in text and "classes: 3" in text
    assert "head n>=100: 1" in text and "medium 20<=n<100: 1" in text and "tail n<20: 1" in text
    assert any(line.split()[1:] == ["dog", "20", "medium"] for line in text.splitlines())


def test_load_prepared_roundtrip(tmp_path):
    p = _write_json(tmp_path / "dataset.json", _dataset_dict())
    d = capnet.load_prepared(p)
    assert d.classes == ["cat", "dog", "traffic light"]
    assert d.image_root == (tmp_path / "images").resolve()  # relative root hangs from the json folder
    assert d.train == [("a.jpg", [0, 2]), ("b.jpg", [1])] and d.test[1] == ("d.jpg", [])


@pytest.mark.parametrize("over, message", [
    (dict(train=[["a.jpg", [0, 3]], ["b.jpg", [1, 2]]]), "'a.jpg' has label 3, out of range for 3 classes"),
    (dict(test=[["c.jpg", [-1]]]), "'c.jpg' has label -1, out of range"),
    (dict(train=[["a.jpg", [0, 2]], ["a.jpg", [1]]]), "duplicate image 'a.jpg' in train"),
    (dict(test=[["b.jpg", [0]]]), "in both train and test, e.g. 'b.jpg'"),
    (dict(classes=[]), "empty class list"),
    (dict(train=[["a.jpg", [0]], ["b.jpg", [0]]]), "class 'dog' has no training image (also ['traffic light'])"),
    (dict(train=[["a.jpg", [0, 0, 1, 2]]]), "repeats a label"),
    (dict(train=[["a.jpg", [0, 1.0, 2]]]), "non-integer label 1.0"),
    (dict(train=[]), "train split is empty"),
])
def test_load_prepared_rejects_bad_input(tmp_path, over, message):
    p = _write_json(tmp_path / "dataset.json", _dataset_dict(**over))
    with pytest.raises(ValueError) as e:
        capnet.load_prepared(p)
    assert message in str(e.value)


def test_load_prepared_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset at .*nothing.json"):
        capnet.load_prepared(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"name": "x", "classes": [')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        capnet.load_prepared(tmp_path / "bad.json")


# ---- raw formats -> dataset.json

def _voc_xml(objects):
    objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><difficult>{int(d)}</difficult>"
                   f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
                   for n, d in objects)
    return f"<annotation><folder>VOC</folder><size><width>12</width><height>10</height></size>{objs}</annotation>"


def _make_voc(root, train, test, extra_trainval=()):
    """VOCdevkit with VOC2012 (trainval = train + extra) and VOC2007 test; {id: [(name, difficult)]}."""
    dev = Path(root) / "VOCdevkit"
    for year, anns in (("VOC2012", {**train, **dict(extra_trainval)}), ("VOC2007", test)):
        (dev / year / "Annotations").mkdir(parents=True)
        (dev / year / "ImageSets/Main").mkdir(parents=True)
        for i, objs in anns.items():
            (dev / year / "Annotations" / f"{i}.xml").write_text(_voc_xml(objs))
        _write_images(dev / year / "JPEGImages", [f"{i}.jpg" for i in anns])
        name = "trainval.txt" if year == "VOC2012" else "test.txt"
        (dev / year / "ImageSets/Main" / name).write_text("\n".join(anns) + "\n")
    return dev


def _voc_toy(tmp_path):
    V = data_prep.VOC_CLASSES
    train = {f"2008_00000{k}": [(V[c], False) for c in range(k, 20, 4)] for k in range(4)}
    train["2008_000001"].append(("person", True))  # difficult objects count
    train["2008_000002"].append(("dog", False))     # a second dog object: still one label
    test = {"000001": [("cat", False), ("dog", True)], "000002": [("train", False)]}
    extra = {"2011_000009": [("cow", False)]}  # in trainval, not in the split
    dev = _make_voc(tmp_path / "raw", train, test, extra)
    split = tmp_path / "img_id.txt"
    split.write_text("\n".join(train) + "\n")
    return dev, split, train


def test_voc_lt_from_vocdevkit(tmp_path, capsys):
    dev, split, train = _voc_toy(tmp_path)
    data_prep.main(["voc-lt", "--voc-root", str(dev.parent), "--split", str(split), "--root", str(tmp_path / "out")])
    d = capnet.load_prepared(tmp_path / "out/voc-lt/dataset.json")
    V = data_prep.VOC_CLASSES
    assert d.classes == V and d.image_root == dev.resolve()
    assert [r for r, _ in d.train] == [f"VOC2012/JPEGImages/{i}.jpg" for i in train]
    assert d.train[0][1] == [0, 4, 8, 12, 16]
    assert d.train[1][1] == sorted([1, 5, 9, 13, 17, V.index("person")])  # difficult person kept
    assert d.test == [("VOC2007/JPEGImages/000001.jpg", [V.index("cat"), V.index("dog")]),
                      ("VOC2007/JPEGImages/000002.jpg", [V.index("train")])]
    out = capsys.readouterr().out
    assert "train: 4 images, test: 2 images" in out and "classes: 20" in out and "tail n<20: 20" in out


def test_voc_lt_make_split_says_not_official(tmp_path, capsys):
    dev, split, train = _voc_toy(tmp_path)
    data_prep.main(["voc-lt", "--voc-root", str(dev), "--make-split", "--seed", "3", "--root", str(tmp_path / "o")])
    assert "NOT the official voc-lt split" in capsys.readouterr().err
    d = json.loads((tmp_path / "o/voc-lt/dataset.json").read_text())
    assert d["source"]["official"] is False and d["source"]["make_split"]["seed"] == 3
    assert d["source"]["make_split"]["pool_images"] == 5  # the VOC2012 trainval list


def test_voc_lt_bad_inputs(tmp_path):
    dev, split, train = _voc_toy(tmp_path)
    out = str(tmp_path / "out")
    (dev / "VOC2012/Annotations/2008_000003.xml").write_text(_voc_xml([("unicorn", False)]))
    with pytest.raises(ValueError, match="2008_000003.xml has an unknown class 'unicorn'"):
        data_prep.prepare_voc_lt(dev, split, out)
    with pytest.raises(SystemExit, match="voc-lt: error: .*2008_000003.xml has an unknown class"):
        data_prep.main(["voc-lt", "--voc-root", str(dev), "--split", str(split), "--root", out])
    with pytest.raises(ValueError, match="exactly one of --split"):
        data_prep.prepare_voc_lt(dev, split, out, make_split=True)
    (dev / "VOC2007").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="VOCdevkit/VOC2007 not found"):
        data_prep.prepare_voc_lt(dev, split, out)


def test_data_prep_verifies_images(tmp_path, capsys):
    dev, split, train = _voc_toy(tmp_path)
    out = tmp_path / "out"
    bad = dev / "VOC2007/JPEGImages/000002.jpg"
    bad.write_bytes(JPEG[:40])  # truncated JPEG
    with pytest.raises(ValueError, match=r"test image .*000002.jpg is unreadable"):
        data_prep.prepare_voc_lt(dev, split, out)
    assert not (out / "voc-lt/dataset.json").exists()
    data_prep.prepare_voc_lt(dev, split, out, skip_bad=True)
    d = json.loads((out / "voc-lt/dataset.json").read_text())
    assert [r for r, _ in d["test"]] == ["VOC2007/JPEGImages/000001.jpg"]
    assert d["source"]["bad_images_skipped"] == {"train": 0, "test": 1}
    assert "skipped 0 bad train and 1 bad test images" in capsys.readouterr().out
    (dev / "VOC2012/JPEGImages/2008_000000.jpg").unlink()
    with pytest.raises(ValueError, match=r"train image .*2008_000000.jpg is missing"):
        data_prep.prepare_voc_lt(dev, split, out)


COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
            31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
            56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
            85, 86, 87, 88, 89, 90]  # the 80 COCO category ids, ascending


def _coco_json(path, names, images, seed=0):
    """instances JSON: images = [(id, [class indices])]; categories written shuffled (order by id is ours)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": COCO_IDS[i], "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    cats = [cats[i] for i in rng.permutation(len(cats))]
    anns, k = [], 0
    for img_id, labels in images:
        for c in list(labels) + list(labels[:1]):  # a repeated object of the first class
            k += 1
            anns.append({"id": k, "image_id": img_id, "category_id": COCO_IDS[c], "iscrowd": 0,
                         "bbox": [0, 0, 2, 2], "area": 4})
    ims = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 12, "height": 10} for i, _ in images]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"images": ims, "annotations": anns, "categories": cats})


def _make_coco(root, names, train_images, val_images):
    _coco_json(root / "annotations/instances_train2017.json", names, train_images)
    _coco_json(root / "annotations/instances_val2017.json", names, val_images, seed=1)
    _write_images(root / "train2017", [f"{i:012d}.jpg" for i, _ in train_images])
    _write_images(root / "val2017", [f"{i:012d}.jpg" for i, _ in val_images])


def test_coco_lt_from_instances_json(tmp_path):
    names = ["person", "bicycle", "car", "motorcycle", "airplane"]
    train = [(9, [4, 0]), (25, [1, 2]), (7, [3]), (30, [0])]
    val = [(5, [2]), (3, []), (8, [0, 4])]  # image 3 has no annotation: kept
    root = tmp_path / "coco"
    _make_coco(root, names, train, val)
    split = tmp_path / "img_id.pkl"
    split.write_text("7\n9\n25\n")  # plain text despite the name, as the official file
    path = data_prep.prepare_coco_lt(root, split, tmp_path / "out")
    d = capnet.load_prepared(path)
    assert d.classes == names  # ascending category id, although the JSON lists them shuffled
    assert d.train == [("train2017/000000000007.jpg", [3]), ("train2017/000000000009.jpg", [0, 4]),
                       ("train2017/000000000025.jpg", [1, 2])]
    assert d.test == [("val2017/000000000005.jpg", [2]), ("val2017/000000000003.jpg", []),
                      ("val2017/000000000008.jpg", [0, 4])]
    split.write_bytes(pickle.dumps([7, 9, 25]))  # a real pickle is read too
    assert capnet.load_prepared(data_prep.prepare_coco_lt(root, split, tmp_path / "out2")).train == d.train
    split.write_text("7\n9\n26\n")
    with pytest.raises(ValueError, match="image id 26 is not in instances_train2017.json"):
        data_prep.prepare_coco_lt(root, split, tmp_path / "out3")


def _make_nus(root, concepts, train, test, missing=()):
    """NUS-WIDE release layout: Concepts81.txt, ImageList/*Imagelist.txt (Windows paths), one 0/1 label
    file per concept and split. train/test: [(relpath, [concept indices])]."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth/TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    for part, items in (("Train", train), ("Test", test)):
        (root / f"ImageList/{part}Imagelist.txt").write_text(
            "".join(r.replace("/", "\\") + "\n" for r, _ in items))
        for c, name in enumerate(concepts):
            (root / f"Groundtruth/TrainTestLabels/Labels_{name}_{part}.txt").write_text(
                "".join(f"{int(c in labels)}\n" for _, labels in items))
        _write_images(root / "Flickr", [r for r, _ in items if r not in missing])


def test_nus_wide_lt(tmp_path, capsys):
    concepts = ["sky", "clouds", "person", "tiger"]
    rng = np.random.default_rng(0)
    train = [(f"{['sky', 'person'][k % 2]}/{k:04d}_{k}.jpg",
              sorted(set(rng.choice(4, size=rng.integers(0, 3), p=[.5, .3, .15, .05]).tolist())))
             for k in range(300)]
    test = [("sky/9000_1.jpg", [0, 1]), ("person/9001_2.jpg", []), ("tiger/9002_3.jpg", [3])]
    missing = {train[5][0], train[6][0], "tiger/9002_3.jpg"}
    _make_nus(tmp_path / "nus", concepts, train, test, missing)
    path = data_prep.prepare_nus_wide_lt(tmp_path / "nus", out_root=tmp_path / "out", seed=0)
    d = capnet.load_prepared(path)
    assert d.classes == concepts and d.image_root == (tmp_path / "nus/Flickr").resolve()
    assert d.test == [("sky/9000_1.jpg", [0, 1]), ("person/9001_2.jpg", [])]  # unlabelled kept, missing out
    labels = dict(train)
    assert all(labels[r] == l and l for r, l in d.train) and not {r for r, _ in d.train} & missing
    src = json.loads(path.read_text())["source"]
    assert src["missing_train"] == 2 and src["missing_test"] == 1 and src["official"] is False
    assert "skipped 2 missing train and 1 missing test images" in capsys.readouterr().out
    # the seeded long-tail draw: the same seed gives the same subset, another seed another one
    again = capnet.load_prepared(data_prep.prepare_nus_wide_lt(tmp_path / "nus", out_root=tmp_path / "o2", seed=0))
    other = capnet.load_prepared(data_prep.prepare_nus_wide_lt(tmp_path / "nus", out_root=tmp_path / "o3", seed=1))
    assert again.train == d.train and other.train != d.train


def test_lists_format(tmp_path):
    (tmp_path / "classes.txt").write_text("person 0\ntraffic light 1 \nfire hydrant 2\n")
    (tmp_path / "train.txt").write_text("imgs/a.jpg 0 2 \nimgs/b.jpg 1 1\n")  # repeated label -> once
    (tmp_path / "test.txt").write_text("imgs/c.jpg 2\nimgs/d.jpg")
    _write_images(tmp_path, ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg"])
    args = ["lists", "--train", str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt"),
            "--classes", str(tmp_path / "classes.txt"), "--image-root", str(tmp_path), "--name", "mine",
            "--root", str(tmp_path / "out")]
    data_prep.main(args)
    d = capnet.load_prepared(tmp_path / "out/mine/dataset.json")
    assert d.classes == ["person", "traffic light", "fire hydrant"]
    assert d.train == [("imgs/a.jpg", [0, 2]), ("imgs/b.jpg", [1])] and d.test[1] == ("imgs/d.jpg", [])
    (tmp_path / "train.txt").write_text("imgs/a.jpg 0 2\nimgs/b.jpg 1 3\n")
    with pytest.raises(SystemExit, match=r"train.txt:2: label 3 of imgs/b.jpg is out of range for 3 classes"):
        data_prep.main(args)
    (tmp_path / "train.txt").write_text("imgs/a.jpg 0 2\nimgs/b.jpg 1\n")
    (tmp_path / "classes.txt").write_text("person 0\ntraffic light 2\nfire hydrant 2\n")
    with pytest.raises(SystemExit, match="line 2 gives index 2"):
        data_prep.main(args)


# ---- long-tail sampling

def test_pareto_targets():
    t = data_prep.pareto_targets(20, 775, 4, 0.2)
    assert t[0] == 775 and t[-1] == 4 and (np.diff(t) <= 0).all()
    # alpha -> 0 tends to the geometric profile; a larger alpha drops faster from the head
    assert (data_prep.pareto_targets(20, 775, 4, 0.5)[1:-1] < t[1:-1]).all()


def test_long_tail_split_hits_targets():
    rng = np.random.default_rng(0)
    y = rng.random((4000, 12)) < rng.random(12) * 0.05 + 0.01  # (N, C) a few extra labels
    y[np.arange(4000), rng.integers(0, 12, 4000)] = True  # one main label per image
    y[:, 1] |= y[:, 0] & (rng.random(4000) < 0.8)  # class 1 rides along with class 0
    keep = data_prep.long_tail_split(y, 300, 5, 0.3, seed=0)
    n = y[keep].sum(0)
    pairs = y.T.astype(int) @ y  # targets go by co-occurrence rank: class 1 co-occurs most
    order = np.argsort(-(pairs.sum(1) - y.sum(0)), kind="stable")
    assert order[0] == 1
    target = np.zeros(12, int)
    target[order] = data_prep.pareto_targets(12, 300, 5, 0.3)
    assert n.tolist() == target.tolist()
    assert (keep == data_prep.long_tail_split(y, 300, 5, 0.3, seed=0)).all()
    assert set(keep) != set(data_prep.long_tail_split(y, 300, 5, 0.3, seed=1))


# ---- the official split files in ../shared/data (skipped when absent)

OFFICIAL = Path(os.environ.get("CAPNET_SHARED_DATA") or SHARED_DATA)  # the env var points elsewhere
needs_shared = pytest.mark.skipif(not (OFFICIAL / "voc_lt").is_dir(), reason=f"{OFFICIAL} not present")


def _official(name):
    with open(OFFICIAL / name / "class_freq.pkl", "rb") as f:
        freq = pickle.load(f)["class_freq"]
    with open(OFFICIAL / name / "class_split.pkl", "rb") as f:
        split = pickle.load(f)
    return np.asarray(freq), split


def _check_official(d, name, n_train, groups):
    freq, split = _official(name)
    counts = capnet.class_counts(d.train, len(d.classes))
    assert len(d.train) == n_train and len(d.classes) == len(freq)
    assert counts.tolist() == freq.tolist()
    got = {g: {c for c in range(len(counts)) if capnet.class_group(counts[c]) == g} for g in ("head", "medium", "tail")}
    assert [len(got[g]) for g in ("head", "medium", "tail")] == groups
    assert got == {"head": set(map(int, split["head"])), "medium": set(map(int, split["middle"])),
                   "tail": set(map(int, split["tail"]))}


@needs_shared
def test_official_voc_lt_statistics(tmp_path):
    # a VOCdevkit whose XMLs carry the released VOC2012 trainval labels (terse_gt_2012.pkl) of the
    # VOC-LT ids plus unlisted ones; odd images mark their objects difficult (they must still count)
    with open(OFFICIAL / "voc_lt/terse_gt_2012.pkl", "rb") as f:
        terse = pickle.load(f)
    V = data_prep.VOC_CLASSES
    ids = (OFFICIAL / "voc_lt/img_id.txt").read_text().split()
    pool = ids + [i for i in terse["idx2img_id"][:400] if i not in set(ids)]
    train = {i: [(V[c], k % 2 == 1) for c in np.flatnonzero(terse["gt_labels"][terse["img_id2idx"][i]])]
             for k, i in enumerate(pool)}
    lmpt_test = (OFFICIAL / "lmpt/voc_lt_test.txt").read_text().splitlines()[:30]
    test = {Path(l.split()[0]).stem: [(V[int(c)], False) for c in l.split()[1:]] for l in lmpt_test}
    dev = _make_voc(tmp_path / "raw", {i: train[i] for i in ids}, test, {i: train[i] for i in pool[len(ids):]})
    d = capnet.load_prepared(data_prep.prepare_voc_lt(dev, OFFICIAL / "voc_lt/img_id.txt", tmp_path / "out"))
    _check_official(d, "voc_lt", 1142, [6, 6, 8])
    assert [Path(r).stem for r, _ in d.train] == ids


@needs_shared
def test_official_coco_lt_statistics(tmp_path):
    # instances JSONs carrying the labels of LMPT's COCO-LT train list (+ unlisted images); the
    # official img_id.pkl selects the 1,909; classes must come out in category-id order
    names = data_prep.read_classes(OFFICIAL / "lmpt/coco_labels.txt")
    lines = (OFFICIAL / "lmpt/coco_lt_train.txt").read_text().splitlines()
    train = [(int(Path(l.split()[0]).stem), sorted({int(c) for c in l.split()[1:]})) for l in lines if l.strip()]
    extra = [(10**8 + k, [k % 80]) for k in range(50)]
    val = [(int(Path(l.split()[0]).stem), [int(c) for c in l.split()[1:]])
           for l in (OFFICIAL / "lmpt/coco_lt_test.txt").read_text().splitlines()[:40]]
    root = tmp_path / "coco"
    _make_coco(root, names, train + extra, val)
    d = capnet.load_prepared(data_prep.prepare_coco_lt(root, OFFICIAL / "coco_lt/img_id.pkl", tmp_path / "out"))
    assert d.classes == names and d.classes[:3] == ["person", "bicycle", "car"]
    _check_official(d, "coco_lt", 1909, [22, 33, 25])
    assert any(not labels for _, labels in d.test)  # val2017 images with no label are kept


@needs_shared
@pytest.mark.parametrize("name, n_train, groups", [("voc", 1142, [6, 6, 8]), ("coco", 1909, [22, 33, 25])])
def test_official_lmpt_lists_statistics(tmp_path, name, n_train, groups):
    lists = OFFICIAL / "lmpt"
    rel = [l.split()[0] for f in (f"{name}_lt_train.txt", f"{name}_lt_test.txt")
           for l in (lists / f).read_text().splitlines() if l.strip()]
    _write_images(tmp_path / "img", rel)
    path = data_prep.prepare_lists(lists / f"{name}_lt_train.txt", lists / f"{name}_lt_test.txt",
                                   lists / f"{name}_labels.txt", tmp_path / "img", f"{name}-lt", tmp_path / "out")
    d = capnet.load_prepared(path)
    _check_official(d, f"{name}_lt", n_train, groups)
    assert len(d.test) == {"voc": 4952, "coco": 5000}[name]


@needs_shared
def test_make_split_on_voc2012_trainval():
    # our sampler on the pool VOC-LT was drawn from: same group sizes as the official split, per-class
    # counts within a mean factor exp(0.2) of the official ones (measured: 0.15)
    with open(OFFICIAL / "voc_lt/terse_gt_2012.pkl", "rb") as f:
        y = np.stack(pickle.load(f)["gt_labels"])
    freq, _ = _official("voc_lt")
    keep = data_prep.long_tail_split(y, seed=0, **data_prep.LT_DEFAULTS["voc-lt"])
    n = y[keep].sum(0)
    assert [sum(capnet.class_group(c) == g for c in n) for g in ("head", "medium", "tail")] == [6, 6, 8]
    assert np.abs(np.log(n / freq)).mean() < 0.2
    assert 1142 <= len(keep) < 1600


# ---- datasets

def _toy_images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    return [(f"{k}.png", [k % 3]) for k in range(4)]


def test_dataset_train_mode_is_seeded(tmp_path):
    items = _toy_images(tmp_path)
    ds = capnet.MultiLabelDataset(items, tmp_path, 3, size=32, mode="train", seed=1)
    x, y, i = ds[2]
    assert x.shape == (3, 32, 32) and y.tolist() == [0, 0, 1] and i == 2
    assert torch.equal(ds[2][0], x)  # a function of (seed, epoch, index) only
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], x)
    again = capnet.MultiLabelDataset(items, tmp_path, 3, size=32, mode="train", seed=1)
    again.set_epoch(1)
    assert torch.equal(again[2][0], ds[2][0])
    ev = capnet.MultiLabelDataset(items, tmp_path, 3, size=32, mode="eval", n_views=5)
    assert ev[0][0].shape == (5, 3, 32, 32)


def test_dataset_bad_images(tmp_path):
    items = _toy_images(tmp_path) + [("gone.png", [0]), ("broken.png", [1])]
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    ds = capnet.MultiLabelDataset(items, tmp_path, 3, size=32, mode="eval", n_views=1)
    with pytest.raises(Exception, match="gone.png"):
        ds[4]
    with pytest.raises(Exception, match="broken.png"):
        ds[5]
    ds = capnet.MultiLabelDataset(items, tmp_path, 3, size=32, mode="train", skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=capnet.collate_skip_bad,
                                         worker_init_fn=capnet.seed_worker)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert batches[1][2].tolist() == [3] and ds.bad_count == 2  # counted across worker processes
    assert capnet.collate_skip_bad([None, None]) is None


# ---- metrics

def _ap_brute_force(scores, y):
    # independent definition: precision and recall at every distinct threshold, AP = sum dR * P
    y = y.astype(np.float64)
    if y.sum() == 0:
        return float("nan")
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        hit = scores >= t
        tp = float((hit & (y == 1)).sum())
        recall, precision = tp / y.sum(), tp / hit.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_average_precision_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (80, 7)).astype(np.float32)  # many ties
    scores[:, 0] = rng.random(80)  # no tie
    y = (rng.random((80, 7)) < 0.3).astype(np.float32)
    y[:, 4] = 0  # no positive -> NaN
    ap = capnet.average_precision(torch.from_numpy(scores), torch.from_numpy(y))
    ref = np.array([_ap_brute_force(scores[:, c], y[:, c]) for c in range(7)])
    assert ap.shape == (7,) and torch.isnan(ap[4]) and np.isnan(ref[4])
    np.testing.assert_allclose(ap.numpy(), ref, rtol=1e-12, atol=1e-12)
    # by hand: scores (3, 2, 2, 1), y (0, 1, 0, 1): thresholds 3: R 0; 2: P 1/3 R 1/2; 1: P 2/4 R 1
    hand = capnet.average_precision(np.array([[3.0], [2], [2], [1]]), np.array([[0.0], [1], [0], [1]]))
    assert abs(float(hand[0]) - (0.5 / 3 + 0.5 * 0.5)) < 1e-12


def test_average_precision_equals_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(200, 9)), 1)  # rounding makes ties
    y = (rng.random((200, 9)) < np.linspace(0.02, 0.6, 9)).astype(np.int64)
    ap = capnet.average_precision(scores, y).numpy()
    ref = [metrics.average_precision_score(y[:, c], scores[:, c]) for c in range(9)]
    np.testing.assert_allclose(ap, ref, rtol=1e-12, atol=1e-12)


def test_average_precision_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        capnet.average_precision(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="0/1"):
        capnet.average_precision(np.zeros((4, 3)), np.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="NaN or inf"):
        capnet.average_precision(np.full((4, 3), np.nan), np.zeros((4, 3)))


def test_lt_map_groups_at_the_boundaries():
    ap = torch.tensor([0.9, 0.5, 0.3, 0.1, float("nan"), 0.7])
    freq = np.array([100, 99, 20, 19, 5, 250])  # 100 is head, 20 is medium, 19 is tail
    m = capnet.lt_map(ap, freq)
    assert m["head"] == pytest.approx(80.0) and m["medium"] == pytest.approx(40.0)
    assert m["tail"] == pytest.approx(10.0) and m["total"] == pytest.approx(50.0) and m["n_nan"] == 1
    only_nan_tail = capnet.lt_map(torch.tensor([0.5, float("nan")]), [150, 3])
    assert np.isnan(only_nan_tail["tail"]) and only_nan_tail["total"] == pytest.approx(50.0)

# -----------------------------------------------------------------------------
# synthetic-lt

_SYN_TINY = dict(size=16, n_train=500, n_test=40, n_pretrain=48, pretrain_steps=2, batch_size=16, width=64,
                 layers=1, text_width=64, text_layers=1, embed_dim=32, log=None)


def _syn_make(tmp_path, name, seed=0):
    return data_prep.make_synthetic_lt(root=tmp_path / name, seed=seed, **_SYN_TINY)


def test_synthetic_lt_tiny_world_is_deterministic_and_loads(tmp_path):
    path = _syn_make(tmp_path, "a")
    again = _syn_make(tmp_path, "b")
    other = _syn_make(tmp_path, "c", seed=1)
    d, d2, d3 = (json.loads(p.read_text()) for p in (path, again, other))
    assert d["train"] == d2["train"] and d["test"] == d2["test"] and d["source"]["clip"] == d2["source"]["clip"]
    assert d["train"] != d3["train"]
    for rel in ("train/00000.png", "test/00039.png"):  # same pixels
        assert (path.parent / "images" / rel).read_bytes() == (again.parent / "images" / rel).read_bytes()
    sd, sd2 = (torch.load(p.parent / "clip.pt", weights_only=True) for p in (path, again))
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)

    prepared = capnet.load_prepared(path)  # the format checks training applies
    assert len(prepared.classes) >= 20 and len(prepared.test) == 40 and all(" " not in c.strip() or c for c in prepared.classes)
    groups = {capnet.class_group(int(n)) for n in capnet.class_counts(prepared.train, len(prepared.classes))}
    assert groups == {"head", "medium", "tail"}
    assert d["source"]["seed"] == 0 and set(d["source"]["zero_shot_map"]) == {"total", "head", "medium", "tail"}
    from PIL import Image
    assert Image.open(prepared.image_root / prepared.train[0][0]).size == (16, 16)

    clip = capnet.load_clip(path.parent / "clip.pt")  # like any real checkpoint
    assert isinstance(clip.visual, capnet.VisionTransformer)  # AdaptFormer applies
    assert clip.visual.input_resolution == 16 and clip.context_length == 77
    assert clip.source["sha256"] == d["source"]["clip"]["sha256"]
    tokens = capnet.tokenize(["a photo of a pine tree."])
    assert clip.encode_text(tokens).shape == (1, 32) and clip.encode_image(torch.zeros(2, 3, 16, 16)).shape == (2, 32)


def test_synthetic_captions_are_exact_tokenizations():
    import re
    captioner = data_prep._SynCaptioner(capnet._tokenizer().encode, p_mention=0.75)
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(50):
        labels, sky, ground = data_prep._syn_sample_labels(rng, np.full(24, 1 / 24), np.full(24, 0.3), 5)
        ids = captioner.tokens(rng, labels, sky, ground)
        text = capnet._tokenizer().decode(ids[1:-1])
        assert capnet.tokenize([text])[0, :len(ids)].tolist() == ids, text
        words = [data_prep.SYN_CAPTION_WORDS.get(n, n) for n in data_prep.SYN_CLASSES]
        said = {c for c, w in enumerate(words) if re.search(rf"\ba {w}\b", text)}
        assert said and said <= set(labels), text  # only objects in the scene, by their caption word
        assert not any(re.search(rf"\b{n}\b", text) for n in data_prep.SYN_CAPTION_WORDS), text
        lengths.append(len(ids))
    # CAPNet's prompts put EOT at 1 + 16 + name + 1: captions must train positions that far
    assert max(lengths) >= 20


def test_synthetic_scenes_follow_their_names():
    rng = np.random.default_rng(0)
    names = data_prep.SYN_CLASSES
    C = len(names)
    pair = np.zeros((C, C), int)
    for _ in range(3000):
        labels, sky, ground = data_prep._syn_sample_labels(rng, np.full(C, 1 / C), np.full(C, 0.3), 5)
        assert 1 <= len(labels) <= 5 and data_prep._syn_compatible(sky, ground)[labels].all()
        pair[np.ix_(labels, labels)] += 1
    idx = names.index
    assert pair[idx("boat"), idx("fish")] > 20 and pair[idx("moon"), idx("star")] > 20
    for a, b in (("sun", "moon"), ("fish", "car"), ("snowman", "palm tree"), ("crab", "duck")):
        assert pair[idx(a), idx(b)] == 0, (a, b)


def test_synthetic_default_long_tail_and_too_small_train_set(tmp_path):
    # the default knobs' label draw (no rendering): all three groups non-empty, every class present
    C = len(data_prep.SYN_CLASSES)
    w = (np.arange(C) + 1.0) ** -1.4
    rng = np.random.default_rng([0, 0])
    labels = [data_prep._syn_sample_labels(rng, w / w.sum(), 0.3 * w / w[0], 5)[0] for _ in range(1500)]
    counts = capnet.class_counts([(None, lab) for lab in labels], C)
    assert counts.min() > 0 and {capnet.class_group(int(n)) for n in counts} == {"head", "medium", "tail"}
    with pytest.raises(ValueError, match="n_train=50"):
        data_prep.make_synthetic_lt(root=tmp_path, **dict(_SYN_TINY, n_train=50))

# -----------------------------------------------------------------------------
# train, eval, predict, CLI, faults

# -----------------------------------------------------------------------------
# bench

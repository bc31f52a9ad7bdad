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

# -----------------------------------------------------------------------------
# synthetic-lt

# -----------------------------------------------------------------------------
# train, eval, predict, CLI, faults

# -----------------------------------------------------------------------------
# bench

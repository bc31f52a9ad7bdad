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


def _random_clip_state_dict(clip_cls, seed=0, **sizes):
    """A random-weight checkpoint: `clip_cls` initialises it, then BatchNorm affine parameters and
    running statistics are drawn too (OpenAI's init zeroes bn3, which would hide the residual
    branches from the comparison)."""
    torch.manual_seed(seed)
    model = clip_cls(**sizes)
    sd = model.state_dict()
    for key, t in sd.items():
        if ("bn" in key or "downsample.1" in key) and t.is_floating_point():
            if key.endswith(("weight", "running_var")):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0, 0.1)
    return {k: v.clone() for k, v in sd.items()}


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
    sd = _random_clip_state_dict(ref_model.CLIP, seed=2, **sizes)
    ref = ref_model.CLIP(**sizes).float().eval()
    ref.load_state_dict(sd)
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
    sd = _random_clip_state_dict(ref_model.CLIP, seed=4, **VIT_B16)
    ours = capnet.build_clip(sd)
    assert ours.embed_dim == 512 and ours.visual.patch_size == 16 and len(ours.visual.transformer.resblocks) == 12
    assert ours.visual.transformer.resblocks[0].attn.n_head == 12 and ours.transformer.resblocks[0].attn.n_head == 8
    ref = ref_model.CLIP(**VIT_B16).float().eval()
    ref.load_state_dict(sd)
    del sd
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

@pytest.fixture(scope="module")
def bench_model():
    model, train_targets = capnet._bench_model(dict(capnet.BENCH_TINY_VIT, transformer_layers=1), 6,
                                               torch.device("cpu"))
    return model, train_targets


def _bench_forward_backward(model, images, targets, criterion):
    """Logits and the gradients of every trainable parameter for one train-mode step."""
    model.train()
    params = [p for part in model.trainable_parts().values() for p in part]
    for p in params:
        p.grad = None
    logits = model(images)  # (B, C)
    criterion(logits, targets).backward()
    return [logits.detach()] + [p.grad.clone() for p in params]


def test_fast_paths_exact_on_and_off(bench_model):
    # each fast path of the train step on vs off: same logits and gradients (float rounding only)
    model, train_targets = bench_model
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    targets = torch.from_numpy(train_targets[:3])
    cfg = capnet.Config()
    crit = capnet.make_criterion(cfg, train_targets.sum(0), len(train_targets))
    crit_ref = capnet.make_criterion(capnet.Config(backend="torch"), train_targets.sum(0), len(train_targets))
    fast = _bench_forward_backward(model, images, targets, crit)
    try:
        capnet._set_fast_paths(model, truncate=False, fused=True)
        no_truncate = _bench_forward_backward(model, images, targets, crit)
        capnet._set_fast_paths(model, truncate=True, fused=False)
        no_fused = _bench_forward_backward(model, images, targets, crit_ref)
        capnet._set_fast_paths(model)
        with capnet._attention_context(sdpa=False):
            no_sdpa = _bench_forward_backward(model, images, targets, crit)
    finally:
        capnet._set_fast_paths(model)
    for other in (no_truncate, no_fused, no_sdpa):
        for a, b in zip(fast, other):  # logits carry exp(t) = 14.3: cosines agree to ~1e-7
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fast[0].abs().max() > 0.1  # logits are not trivially zero


def test_eval_cache_exact(bench_model):
    model, _ = bench_model
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        cached = [model(images) for _ in range(2)]  # the second call reads the cache
        model._text_cache = None
        fresh = model(images)
    torch.testing.assert_close(cached[1], fresh, rtol=0, atol=0)
    torch.testing.assert_close(cached[0], fresh, rtol=0, atol=0)


def test_compile_matches_eager(bench_model):
    # torch.compile through the fused ops (custom ops when the extension is built): the
    # aot_eager backend traces forward and backward like inductor does, without its C++ build
    model, train_targets = bench_model
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.from_numpy(train_targets[:2])
    crit = capnet.make_criterion(capnet.Config(), train_targets.sum(0), len(train_targets))
    eager = _bench_forward_backward(model, images, targets, crit)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got = _bench_forward_backward(compiled, images, targets, crit)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vit_flop_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    clip = capnet._bench_clip(capnet.BENCH_TINY_VIT, torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    # the math attention path shows its two matmuls to the counter (the fused SDPA kernel does not)
    with torch.no_grad(), capnet._attention_context(sdpa=False), FlopCounterMode(display=False) as counter:
        clip.encode_image(images)
    assert capnet._vit_forward_flops(clip.visual, 2) == counter.get_total_flops()


def test_bench_quick_json_and_table(tmp_path, capsys):
    import json
    path = tmp_path / "bench.json"
    result = capnet.bench(quick=True, json_path=str(path))
    assert json.loads(path.read_text()) == result
    machine, rows = result["machine"], {r["name"]: r for r in result["rows"]}
    assert machine["quick"] is True and machine["fp32_gemm_gflops"] > 0
    required = ["loss_fused_vs_ref", "propagate_fused_vs_ref", "text_truncated_vs_full",
                "train_step_fast_vs_naive"] + (["train_step_bf16_vs_fp32"] if machine["bf16"] else [])
    assert set(required) <= set(rows)
    table = capsys.readouterr().out
    for name, r in rows.items():
        assert {"name", "baseline_ms", "fast_ms", "ratio", "max_abs_diff"} <= set(r)
        assert r["baseline_ms"] > 0 and r["fast_ms"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["fast_ms"], rel=1e-3)
        assert name in table
        if name.startswith(("train_step_bf16", "image_fwd_vs_gemm")):
            continue
        assert r["max_abs_diff"] < 1e-4, name  # every fp32 fast path gives the same outputs
    # truncation really shortened the text context: 16 context tokens + name + SOT/EOT
    assert "22 of 77 positions" in rows["text_truncated_vs_full"]["note"]

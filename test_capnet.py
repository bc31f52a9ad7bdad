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

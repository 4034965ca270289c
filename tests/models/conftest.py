"""Shared tiny variants and a synthetic CLIP BPE vocab for the model tests."""

import pytest

from trm_jax import models
from trm_jax.models import clip, tokenizer

# Class names and prompts the synthetic BPE vocab is learned from.
CORPUS = [
    "a photo of a cat.",
    "a photo of a dog.",
    "a bad photo of the airplane.",
    "itap of a truck.",
    "art of the automobile.",
    "a photo of the small bird!",
    "a photo of the large frog, 2 frogs.",
    "a origami deer.",
    "a horse in a video game.",
    "it's a ship's photo; they're here.",
]
NUM_MERGES = 80


@pytest.fixture(scope="session")
def corpus() -> tuple[list[str], int]:
    """``(texts, number of merges)`` the synthetic vocab is learned from."""
    return CORPUS, NUM_MERGES


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory) -> str:
    """A gzip BPE merges file in open_clip's format, learned from ``CORPUS``."""
    path = str(tmp_path_factory.mktemp("vocab") / "bpe_tiny.txt.gz")
    tokenizer.write_vocab(path, tokenizer.learn_merges(CORPUS, NUM_MERGES))
    return path


@pytest.fixture(scope="session")
def tok(vocab_path) -> tokenizer.ClipTokenizer:
    return tokenizer.ClipTokenizer(vocab_path, context_length=16)


@pytest.fixture(scope="session")
def tiny_vit():
    """RGB 32 px, patch 8 (a 4x4 grid), 2 blocks of width 32."""
    return models.get(
        "vit_tiny", image_size=32, patch_size=8, channels=3, width=32, depth=2, heads=4, mlp_dim=64
    )


@pytest.fixture(scope="session")
def tiny_clip(tok):
    """Both CLIP towers at width 32, sized to the synthetic vocab."""
    return clip.CLIPConfig(
        name="clip_tiny",
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=4,
        vision_mlp_dim=64,
        text_width=32,
        text_layers=2,
        text_heads=4,
        text_mlp_dim=64,
        vocab_size=tok.vocab_size,
        context_length=16,
        projection_dim=16,
    )

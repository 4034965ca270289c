"""CLIP BPE tokenizer on hand-written and learned merge files."""

import gzip

import numpy as np
import pytest

from trm_jax.errors import CheckpointError
from trm_jax.models import tokenizer


def _byte_id(ch: str, word_end: bool = False) -> int:
    """Id of a single printable ASCII byte symbol: printable bytes come first from '!'."""
    return (256 if word_end else 0) + ord(ch) - ord("!")


@pytest.fixture()
def hand(tmp_path):
    path = str(tmp_path / "hand.txt.gz")
    tokenizer.write_vocab(path, [("c", "a"), ("ca", "t</w>"), ("o", "f</w>")])
    return tokenizer.ClipTokenizer(path, context_length=8)


def test_vocab_layout(hand):
    assert hand.vocab_size == 256 + 256 + 3 + 2
    assert (hand.sot_token_id, hand.eot_token_id) == (515, 516)
    assert hand.decoder[512] == "ca" and hand.decoder[513] == "cat</w>"
    assert len(tokenizer.bytes_to_unicode()) == 256
    assert tokenizer.MAX_MERGES == 48894  # 49408 ids for the published vocab


def test_hand_computed_ids(hand):
    # "cat" merges fully (c+a, then ca+t</w>); "dog" has no merge; "!" is its own word.
    assert hand.encode("Cat!") == [513, _byte_id("!", True)]
    assert hand.encode("dog") == [_byte_id("d"), _byte_id("o"), _byte_id("g", True)]
    assert hand.encode("of cats") == [514, 512, _byte_id("t"), _byte_id("s", True)]
    row = hand(["cat of"])[0]
    np.testing.assert_array_equal(row, [515, 513, 514, 516, 0, 0, 0, 0])
    assert row.dtype == np.int32


def test_cleaning_and_truncation(hand):
    assert tokenizer.clean("  A\t&amp;amp;  B\n") == "a & b"
    assert hand.encode("CAT") == hand.encode("cat")
    long = hand(["dog " * 20])[0]
    assert long.shape == (8,) and long[0] == 515 and long[-1] == 516  # still ends with eot
    assert hand.decode(hand(["cat of dog"])[0]) == "cat of dog"


def test_learned_vocab_round_trips(tok, corpus):
    texts, num_merges = corpus
    assert tok.vocab_size == 512 + num_merges + 2
    ids = tok(texts)
    for text, row in zip(texts, ids, strict=True):
        # decoding puts a space after every word, punctuation included (CLIP does the same)
        assert tok.decode(row).replace(" ", "") == tokenizer.clean(text).replace(" ", "")
        assert row[0] == tok.sot_token_id and (row == tok.eot_token_id).sum() == 1
    # frequent words were merged into single tokens
    assert tok.encode("photo") == [tok.encoder["photo</w>"]]


def test_bad_vocab_files(tmp_path):
    with pytest.raises(CheckpointError, match="bpe_simple_vocab_16e6"):
        tokenizer.ClipTokenizer(str(tmp_path / "absent.txt.gz"))
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version: 0.2\na b c\n")
    with pytest.raises(CheckpointError, match="not a CLIP BPE merges file"):
        tokenizer.ClipTokenizer(str(bad))
    junk = tmp_path / "junk.txt.gz"
    junk.write_bytes(b"\x00\x01 not gzip")
    with pytest.raises(CheckpointError, match="cannot read"):
        tokenizer.ClipTokenizer(str(junk))

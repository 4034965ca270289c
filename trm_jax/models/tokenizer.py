"""CLIP's byte-level BPE tokenizer, read from the vocab file OpenAI and open_clip ship.

The file (``bpe_simple_vocab_16e6.txt.gz``) is gzip text: a ``#version`` header line,
then one merge per line (``"t h"``, ``"th e</w>"``, ...), best first. The vocabulary is
256 byte symbols, the same with the end-of-word marker ``</w>``, one token per merge
(the first 48,894 merges, as in CLIP), then ``<|startoftext|>`` and ``<|endoftext|>``:
49,408 ids for the real file, with end-of-text the last id.

Hugging Face CLIP repositories (``openai/clip-vit-base-patch16``) publish the same
merges as plain-text ``merges.txt`` and the token -> id table as ``vocab.json``;
``ClipTokenizer(merges_txt, vocab_json=...)`` reads that pair, taking the ids from
``vocab.json`` as transformers does (they equal the ids derived from the merges).

Text cleaning follows CLIP without its ``ftfy`` dependency: Unicode NFC, HTML entities
unescaped twice, whitespace runs collapsed, lower case. (``ftfy`` also repairs
mojibake; class names and prompt templates do not need it.)
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import regex

from trm_jax.errors import CheckpointError

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # merges CLIP keeps from the file: 48,894
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (printable bytes first)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clean(text: str) -> str:
    """CLIP's basic + whitespace cleaning (without ftfy), lower-cased."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


def _words(text: str) -> list[str]:
    """Cleaned text -> pre-tokens, each spelled in the byte-level alphabet."""
    table = bytes_to_unicode()
    return ["".join(table[b] for b in tok.encode("utf-8")) for tok in _PATTERN.findall(clean(text))]


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=True))


def _merge_word(word: tuple[str, ...], first: str, second: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """Tokens in id order: byte symbols, the same with ``</w>``, one per merge, SOT, EOT."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]


def _read_vocab_json(path: str) -> dict[str, int]:
    """The token -> id table of a Hugging Face ``vocab.json`` (``CheckpointError`` if bad)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"CLIP tokenizer vocab.json not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read CLIP tokenizer vocab {path}: {err}") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise CheckpointError(f"{path} is not a token -> id JSON object")
    return table


class ClipTokenizer:
    """Text -> CLIP token ids, from the BPE merges file at ``vocab_path``.

    ``tokenizer(texts)`` returns ``int32 [N, context_length]``: start-of-text, the BPE
    ids, end-of-text, zero padding; over-long texts are truncated and still end with
    end-of-text (open_clip's behaviour). ``.gz`` files are decompressed; plain text works too.
    With ``vocab_json`` (a Hugging Face ``vocab.json``; ``vocab_path`` is then its
    ``merges.txt``) the ids come from that table, which must hold every token the merges
    can produce.
    """

    def __init__(
        self,
        vocab_path: str,
        *,
        context_length: int = 77,
        max_merges: int = MAX_MERGES,
        vocab_json: str | None = None,
    ):
        if not os.path.isfile(vocab_path):
            raise CheckpointError(
                f"CLIP tokenizer vocab not found: {vocab_path} (it is open_clip's "
                "bpe_simple_vocab_16e6.txt.gz, shipped with the open_clip and CLIP packages, "
                "or the merges.txt of a Hugging Face CLIP repository)"
            )
        opener = gzip.open if vocab_path.endswith(".gz") else open
        try:
            with opener(vocab_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as err:
            raise CheckpointError(f"cannot read CLIP tokenizer vocab {vocab_path}: {err}") from None
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()][:max_merges]
        bad = [" ".join(m) for m in merges if len(m) != 2]
        if bad or not lines[0].startswith("#"):
            raise CheckpointError(
                f"{vocab_path} is not a CLIP BPE merges file (a '#version' header, then one "
                f"'a b' merge per line); offending lines: {bad[:3] or lines[:1]}"
            )
        vocab = _vocab(merges)
        if vocab_json is None:
            self.encoder = {token: i for i, token in enumerate(vocab)}
        else:
            self.encoder = _read_vocab_json(vocab_json)
            absent = [t for t in vocab if t not in self.encoder]
            if absent:
                raise CheckpointError(
                    f"{vocab_json} lacks {len(absent)} tokens of {vocab_path} "
                    f"(e.g. {absent[:3]}): the two files are not one tokenizer"
                )
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.context_length = context_length
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = max(self.encoder.values()) + 1
        self._cache = {SOT: SOT, EOT: EOT}

    def bpe(self, token: str) -> list[str]:
        """Split one byte-level pre-token into vocabulary entries (lowest rank merges first)."""
        if token in self._cache:
            return self._cache[token].split(" ")
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pair = min(_get_pairs(word), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            word = _merge_word(word, *pair)
        self._cache[token] = " ".join(word)
        return list(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        return [self.encoder[piece] for word in _words(text) for piece in self.bpe(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, up to the first end-of-text (special tokens dropped; for inspection)."""
        table = {c: b for b, c in bytes_to_unicode().items()}
        out = bytearray()
        for i in map(int, ids):
            if i == self.eot_token_id:
                break  # what follows is padding
            if i == self.sot_token_id:
                continue
            token = self.decoder[i]
            word_end = token.endswith("</w>")
            out += bytes(table[c] for c in (token[:-4] if word_end else token))
            out += b" " if word_end else b""
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """``int32 [N, context_length]`` token matrix for one text or a list of texts."""
        length = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), length), np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id][:length]
            ids[-1] = self.eot_token_id
            row[: len(ids)] = ids
        return out


def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn ``num_merges`` BPE merges from ``texts`` (most frequent pair first, ties broken
    lexicographically): a small vocab in CLIP's format, for offline tests and toy runs."""
    words = Counter()
    for text in texts:
        for w in _words(text):
            words[tuple(w[:-1]) + (w[-1] + "</w>",)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word[:-1], word[1:], strict=True):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            merged[_merge_word(word, *best)] += count
        words = merged
    return merges


def write_vocab(path: str, merges: Sequence[tuple[str, str]]) -> None:
    """Write ``merges`` in the ``bpe_simple_vocab_16e6.txt.gz`` format (gzip if ``.gz``)."""
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


def write_hf_vocab(directory: str, merges: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Write ``merges`` as a Hugging Face CLIP tokenizer pair in ``directory``:
    ``vocab.json`` (token -> id) and ``merges.txt``; returns ``(vocab_json, merges_txt)``."""
    vocab_json = os.path.join(directory, "vocab.json")
    merges_txt = os.path.join(directory, "merges.txt")
    with open(vocab_json, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(_vocab(merges))}, f, ensure_ascii=False)
    write_vocab(merges_txt, merges)
    return vocab_json, merges_txt

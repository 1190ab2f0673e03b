"""Build a Hugging Face `tokenizers` JSON equivalent to open_clip's `SimpleTokenizer`.

The vocabulary comes from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` and is laid out
exactly like ``SimpleTokenizer.__init__`` does it:

* ids 0..255: the 256 byte symbols of GPT-2's byte-to-unicode table,
* ids 256..511: the same symbols with the ``</w>`` end-of-word suffix,
* ids 512..49405: one id per merge, in merge-rank order (48,894 merges),
* 49406 ``<start_of_text>`` and 49407 ``<end_of_text>``: 49,408 ids in all.

The pipeline mirrors ``SimpleTokenizer.encode``: whitespace collapsing, strip and lowercasing
(normalizer), open_clip's regex split then byte-to-unicode mapping (pre-tokenizer), byte-level BPE
with the ``</w>`` suffix (model), and ``<start_of_text> ... <end_of_text>`` (post-processor).

What `tokenizers` cannot do is left to the runtime (`clipserve.server.tokenizer`): ftfy's
``fix_text`` and the double ``html.unescape`` of open_clip's ``basic_clean``, Python's exact
``str.split``/``str.lower`` semantics for non-ASCII text, and recognising the special-token
strings written inside a text. The two special tokens are therefore in the model vocabulary but
not registered as *added* tokens: `tokenizers` would split them out of any text, open_clip only
where its regex starts a new match (see docs/export.md).
"""

from __future__ import annotations

import gzip
import logging
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

logger = logging.getLogger(__name__)

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
EOW_SUFFIX = "</w>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2
PAD_TOKEN_ID = 0

#: open_clip's pre-tokenisation regex (``SimpleTokenizer.pat``) without the special-token
#: alternatives, which the runtime handles. open_clip compiles it case-insensitive; on lowercased
#: text that only matters for "'ſ" (long s folds to "s"), and ``(?i)`` halves the speed of
#: `tokenizers`, so the runtime adds it back only for the texts that contain "'ſ".
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
#: Python's ``str.split()`` also splits on the ASCII separators U+001C..U+001F, which the
#: Unicode ``\s`` of `tokenizers` does not include.
WHITESPACE_PATTERN = r"[\s\x{1c}-\x{1f}]+"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as open_clip defines it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in codepoints), strict=True))


def default_bpe_path() -> Path:
    """open_clip's bundled BPE merges file (imports open_clip: export side only)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merges open_clip uses: lines 1..48894 of the file (line 0 is a version header)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not open_clip's CLIP BPE merges file")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in `SimpleTokenizer`'s order."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + EOW_SUFFIX for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def build_clip_tokenizer(bpe_path: Path | None = None) -> Tokenizer:
    """The CLIP tokenizer as a `tokenizers.Tokenizer` (no truncation, no padding)."""
    merges = read_merges(bpe_path or default_bpe_path())
    vocab = build_vocab(merges)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            end_of_word_suffix=EOW_SUFFIX,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # open_clip: whitespace_clean(basic_clean(text)).lower(), minus ftfy and html.unescape.
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(WHITESPACE_PATTERN), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, vocab[SOT_TOKEN]), (EOT_TOKEN, vocab[EOT_TOKEN])],
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(EOW_SUFFIX, " ")]
    )
    return tokenizer


def write_tokenizer_json(path: Path, bpe_path: Path | None = None) -> Tokenizer:
    """Build the tokenizer and save it as ``tokenizer.json`` at `path`."""
    tokenizer = build_clip_tokenizer(bpe_path)
    tokenizer.save(str(path))
    logger.debug("wrote CLIP tokenizer (%d ids) to %s", tokenizer.get_vocab_size(), path)
    return tokenizer

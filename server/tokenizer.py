"""The runtime CLIP tokenizer: open_clip's token ids without torch or open_clip.

BPE and the regex split run in Rust (`tokenizers`, from the repository's ``tokenizer.json``);
the text cleaning of open_clip's ``SimpleTokenizer`` is applied here in Python with the very
functions open_clip uses, so the ids are open_clip's:

1. ``ftfy.fix_text`` only for text that ftfy could change. Printable ASCII without ``&`` passes
   ftfy unchanged (checked by the tests); control characters, terminal escapes, HTML entities
   and non-ASCII text go through ftfy.
2. ``html.unescape`` twice, only when ``&`` is present.
3. ``strip``, ``" ".join(text.split())`` and ``str.lower()`` with Python's Unicode semantics
   (e.g. the final sigma, which the Rust normalizer in ``tokenizer.json`` does not reproduce; the
   runtime therefore disables that normalizer).
4. The special-token strings ``<start_of_text>``/``<end_of_text>`` written in a text become their
   ids where open_clip's regex starts a new match on them, i.e. unless they continue a run of
   punctuation (``"!<end_of_text>"`` stays ordinary text, as in open_clip).
5. open_clip's regex is case-insensitive, which on lowercased text only matters for the
   contraction "'ſ" (long s folds to "s"); ``tokenizer.json`` leaves ``(?i)`` out (it halves the
   speed) and the few texts with "'ſ" go through a case-insensitive copy of the pre-tokenizer.
6. U+0345 (combining ypogegrammeni) is matched by no alternative of open_clip's case-insensitive
   regex: it separates words like a space, so it is replaced by one.

Speed: texts that are printable ASCII once cleaned (nearly all prompts) are split in Python with
open_clip's regex written with ASCII classes (exact on printable ASCII, where the byte-level
mapping is the identity), and each word's BPE comes from the `tokenizers` model through a
bounded per-word cache, as open_clip caches its BPE too. Everything else goes through
`Tokenizer.encode_batch`. Start and end of text are added here, not by the post-processor.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, pre_tokenizers

from clipserve.repository import RepositoryError, TokenizerInfo

from .errors import InvalidInput

logger = logging.getLogger(__name__)

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
LONG_S_CONTRACTION = "'\u017f"
#: open_clip's split regex (``SimpleTokenizer.pat`` without its special-token alternatives), as
#: ``clipserve export`` writes it into tokenizer.json.
OPEN_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
#: The same on lowercased printable ASCII, where \p{L} is [a-z] and \p{N} is [0-9]. The
#: alternatives are reordered (the first character decides which one can match, so the matches
#: are the same) to try the common case, a word, first: 1.7x faster in Python's `re`.
ASCII_SPLIT = r"""[a-z]+|[0-9]|'(?:s|t|re|ve|m|ll|d)|[^\sa-z0-9]+"""
_ASCII_WORDS = re.compile(ASCII_SPLIT)
#: Distinct words whose BPE ids are cached (a few MB at most).
WORD_CACHE_SIZE = 1 << 16
#: Characters open_clip's regex never matches, in no context: word separators like a space.
_UNMATCHED = "\u0345"


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower``: basic_clean, whitespace_clean, lower."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    if "&" in text:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _prepare_text(text: str) -> str:
    text = clean_text(text)
    if not text.isascii() and _UNMATCHED in text:
        text = text.replace(_UNMATCHED, " ")
    return text


class ClipTokenizer:
    """Text -> open_clip token ids (with start and end of text), for one model repository."""

    def __init__(self, tokenizer: Tokenizer, info: TokenizerInfo) -> None:
        variants = _Variants(tokenizer)
        self._general = variants.general
        self._folding = variants.folding
        self._word_ids = variants.word_ids
        self.info = info
        self.context_length = info.context_length
        self.sot_token_id = info.sot_token_id
        self.eot_token_id = info.eot_token_id
        self.pad_token_id = info.pad_token_id
        self._specials = ((SOT_TOKEN, info.sot_token_id), (EOT_TOKEN, info.eot_token_id))

    @classmethod
    def from_repository(cls, root: Path, info: TokenizerInfo) -> ClipTokenizer:
        """Load ``root / info.file`` and check it agrees with the manifest's ids."""
        path = Path(root) / info.file
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise RepositoryError(f"cannot load tokenizer {info.file}: {exc}") from exc
        for token, expected in ((SOT_TOKEN, info.sot_token_id), (EOT_TOKEN, info.eot_token_id)):
            actual = tokenizer.token_to_id(token)
            if actual != expected:
                raise RepositoryError(
                    f"tokenizer {info.file} maps {token} to {actual}, the manifest says {expected}"
                )
        return cls(tokenizer, info)

    def encode_batch(self, texts: Sequence[str], truncate: bool = True) -> list[np.ndarray]:
        """Token ids per text, int64, starting with sot and ending with eot.

        Texts longer than ``context_length`` tokens are cut like open_clip does it (the first
        ``context_length`` ids, the last replaced by eot), or refused with `InvalidInput` naming
        the item when `truncate` is false.
        """
        contents: list[list[int] | None] = [None] * len(texts)
        general_rows: list[int] = []
        general_texts: list[str] = []
        word_ids = self._word_ids
        words = _ASCII_WORDS.findall

        def ascii_ids(text: str) -> list[int]:  # cleaned printable ASCII: cached word BPE
            assert word_ids is not None
            ids: list[int] = []
            for word in words(text):
                ids += word_ids(word)
            return ids

        for i, raw in enumerate(texts):
            fast = word_ids is not None and raw.isascii() and raw.isprintable() and "&" not in raw
            # `clean_text` without ftfy and html on such texts: they would leave them unchanged
            text = " ".join(raw.split()).lower() if fast else _prepare_text(raw)
            if "_of_text>" in text or LONG_S_CONTRACTION in text:
                contents[i] = self._encode_rare(text)
            elif word_ids is not None and text.isascii() and text.isprintable():
                contents[i] = ascii_ids(text)
            else:
                general_rows.append(i)
                general_texts.append(text)
        if general_rows:
            encodings = self._general.encode_batch_fast(general_texts)
            for i, encoding in zip(general_rows, encodings, strict=True):
                contents[i] = encoding.ids
        return self._finish(contents, truncate)

    def _finish(self, contents: list[list[int] | None], truncate: bool) -> list[np.ndarray]:
        """Per text sot + content + eot as int64, truncated the open_clip way or refused.

        All rows are read-only views of one array: one conversion from Python ints for the
        whole batch instead of one per text.
        """
        sot, eot, limit = self.sot_token_id, self.eot_token_id, self.context_length
        flat: list[int] = []
        ends: list[int] = []
        for index, content in enumerate(contents):
            assert content is not None
            total = len(content) + 2
            if total > limit:
                if not truncate:
                    raise InvalidInput(
                        f"text is {total} tokens long, the model accepts at most {limit} "
                        "(including start and end of text); shorten it or allow truncation",
                        item=f"texts[{index}]",
                    )
                content = content[: limit - 2]
            flat.append(sot)
            flat += content
            flat.append(eot)
            ends.append(len(flat))
        ids = np.array(flat, dtype=np.int64)
        ids.flags.writeable = False
        return [ids[start:end] for start, end in zip([0, *ends], ends)]  # noqa: B905

    def _encode_rare(self, text: str) -> list[int]:
        """Content ids of a cleaned text with special-token strings or "'ſ" in it.

        open_clip's regex tries the special tokens first wherever a match starts; without them
        the regex starts matches at the same places up to the first recognised special token.
        So: split with the tokenizer's own pre-tokenizer, take the first special-token string
        that begins a pre-token, encode the text before it, and go on after it.
        """
        ids: list[int] = []
        rest = text
        while rest:
            found = self._first_special(rest)
            if found is None:
                break
            position, token, token_id = found
            ids += self._encode_segment(rest[:position])
            ids.append(token_id)
            rest = rest[position + len(token) :]
        ids += self._encode_segment(rest)
        return ids

    def _first_special(self, text: str) -> tuple[int, str, int] | None:
        """(char offset, token, id) of the first special-token string that starts a match."""
        if "_of_text>" not in text:
            return None
        pieces = self._general.pre_tokenizer.pre_tokenize_str(text)
        starts = {start for _, (start, _) in pieces}
        candidates = []
        for token, token_id in self._specials:
            position = text.find(token)
            while position != -1 and position not in starts:
                position = text.find(token, position + 1)
            if position != -1:
                candidates.append((position, token, token_id))
        return min(candidates) if candidates else None

    def _encode_segment(self, text: str) -> list[int]:
        if not text.strip():
            return []
        tokenizer = self._folding if LONG_S_CONTRACTION in text else self._general
        return list(tokenizer.encode(text).ids)


class _Variants:
    """The runtime's views of ``tokenizer.json``: same vocabulary and merges, different splits.

    * general: the file's pre-tokenizer (open_clip's split, byte-level mapping);
    * word_ids: the BPE ids of one word of printable ASCII (no byte-level mapping needed: it
      is the identity there), cached;
    * folding: open_clip's split case-insensitive, for texts with "'ſ".

    The tokenizers have no normalizer (cleaning is done in Python) and no post-processor. The
    ASCII and folding paths exist only when the file's split is open_clip's; otherwise the
    general tokenizer serves every text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.normalizer = None  # type: ignore[assignment]
        tokenizer.post_processor = None  # type: ignore[assignment]
        self.general = tokenizer
        self.folding = tokenizer
        self.word_ids: Callable[[str], tuple[int, ...]] | None = None
        if _split_pattern(tokenizer) != OPEN_CLIP_SPLIT:
            logger.warning("tokenizer.json has an unexpected pre-tokenizer; no fast paths")
            return
        model = tokenizer.model

        def bpe(word: str) -> tuple[int, ...]:
            return tuple(token.id for token in model.tokenize(word))

        self.word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(bpe)
        self.folding = Tokenizer.from_str(tokenizer.to_str())
        self.folding.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[assignment]
            [
                pre_tokenizers.Split(
                    Regex("(?i)" + OPEN_CLIP_SPLIT), behavior="removed", invert=True
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )


def _split_pattern(tokenizer: Tokenizer) -> str | None:
    """The regex of a Split + ByteLevel pre-tokenizer, or None for anything else."""
    data = json.loads(tokenizer.to_str())
    try:
        split, byte_level = data["pre_tokenizer"]["pretokenizers"]
        if split["type"] != "Split" or byte_level["type"] != "ByteLevel":
            return None
        return str(split["pattern"]["Regex"])
    except (KeyError, TypeError, ValueError):
        return None


def pad_batch(ids_list: Sequence[np.ndarray], length: int, pad_id: int = 0) -> np.ndarray:
    """Stack token ids into an int64 array [N, length], right-padded with `pad_id`."""
    batch = np.full((len(ids_list), length), pad_id, dtype=np.int64)  # [N, length]
    if not ids_list:
        return batch
    lengths = np.fromiter((ids.shape[0] for ids in ids_list), dtype=np.intp, count=len(ids_list))
    too_long = np.flatnonzero(lengths > length)
    if too_long.size:
        row = int(too_long[0])
        raise ValueError(f"row {row} has {lengths[row]} ids, longer than {length}")
    # the mask's True cells, in row-major order, are exactly the concatenated rows' places
    batch[np.arange(length) < lengths[:, None]] = np.concatenate(ids_list)
    return batch

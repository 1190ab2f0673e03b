"""The serving core: encode, classify and rank on top of the two batched towers.

Transport-free (no gRPC types): the gRPC layer converts wire messages into the inputs below and
results back. Image decoding and tokenisation run on a thread pool (short texts and float32
tensors, cheaper than the hand-off, on the event loop); inference runs on each batcher's own
thread; the event loop only coordinates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipserve.repository import Manifest
from clipserve.server.batcher import DynamicBatcher
from clipserve.server.errors import (
    ClipServeError,
    DeadlineExpired,
    Forbidden,
    InvalidInput,
    NotReady,
    Overloaded,
)
from clipserve.server.label_cache import LabelCache
from clipserve.server.trace import current as current_trace

log = logging.getLogger(__name__)

#: Requests of at most this many texts and characters are tokenised on the event loop: a few
#: short texts take ~15 us, the round trip through the thread pool ~200 us of CPU. Anything
#: larger goes to the pool, so the loop never stalls on tokenisation.
INLINE_TOKENIZE_TEXTS = 8
INLINE_TOKENIZE_CHARS = 1024


# -- inputs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedImage:
    data: bytes


@dataclass(frozen=True)
class TensorImage:
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16"
    data: bytes | memoryview  # little-endian values, C order; a byte-format view is not copied


@dataclass(frozen=True)
class UrlImage:
    url: str


ImageInput = EncodedImage | TensorImage | UrlImage
RankInput = str | EncodedImage | TensorImage | UrlImage  # str: a text


def _timing_input() -> contextlib.AbstractContextManager[None]:
    """Count the block as input preparation of the current request, if one is traced."""
    trace = current_trace()
    return trace.timing_input() if trace is not None else contextlib.nullcontext()


class _Admission:
    """`ClipModel.admit`'s context manager: one object per model, no state of its own (a
    generator-based one would cost a generator per request)."""

    __slots__ = ("_model",)

    def __init__(self, model: ClipModel) -> None:
        self._model = model

    def __enter__(self) -> None:
        self._model._enter()

    def __exit__(self, *_exc: object) -> None:
        self._model._leave()


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    """A label (Classify) or candidate (Rank) with its position, probability and cosine."""

    index: int
    probability: float
    score: float


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_labels: int
    max_templates: int
    max_concurrent_requests: int


class ClipModel:
    """Encode, Classify and Rank for one exported CLIP model."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        vision: DynamicBatcher[np.ndarray, np.ndarray],
        text: DynamicBatcher[np.ndarray, np.ndarray],
        preprocessor: Any,  # clipserve.server.preprocess.ImagePreprocessor
        tokenizer: Any,  # clipserve.server.tokenizer.ClipTokenizer
        pool: Any,  # concurrent.futures.Executor for preprocessing and tokenisation
        label_cache: LabelCache,
        limits: Limits,
        fetcher: Any = None,  # clipserve.server.urls.UrlFetcher; None: URL inputs refused
    ) -> None:
        self.manifest = manifest
        self.vision = vision
        self.text = text
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.label_cache = label_cache
        self.limits = limits
        self._pool = pool
        self._fetcher = fetcher
        self._in_flight = 0
        self._decoding = 0  # images admitted and not yet queued in the vision batcher
        self._idle = asyncio.Event()
        self._idle.set()
        self._refused = asyncio.Event()  # set by every request refused as not ready
        self._admission = _Admission(self)
        self.ready = False

    # -- admission ---------------------------------------------------------------------------
    def admit(self) -> contextlib.AbstractContextManager[None]:
        """Refuse at the door when not ready or when too many requests are in flight:
        ``with model.admit(): ...`` counts the block as one request in flight."""
        return self._admission

    def _enter(self) -> None:
        if not self.ready:
            self._refused.set()
            raise NotReady("the model is not ready (starting, recovering or shutting down)")
        if self._in_flight >= self.limits.max_concurrent_requests:
            raise Overloaded(
                f"{self._in_flight} requests in flight, the limit is "
                f"{self.limits.max_concurrent_requests} (max_concurrent_requests); "
                "retry with backoff"
            )
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @contextlib.contextmanager
    def _admit_images(self, n: int) -> Iterator[None]:
        """Refuse at once when the images waiting for the vision tower (being fetched or
        decoded, plus queued for a batch) would exceed its max_queue_size.

        Counting the decoding backlog too keeps the bound where the work waits: when decoding,
        not inference, is the bottleneck, the batcher's own queue stays short while requests
        pile up in front of the preprocessing pool.
        """
        limit = self.vision.config.max_queue_size
        waiting = self._decoding + self.vision.queued
        if waiting + n > limit:
            raise Overloaded(
                f"vision queue is full ({waiting} of {limit} items waiting, request has {n}); "
                "retry with backoff"
            )
        self._decoding += n
        try:
            yield
        finally:
            self._decoding -= n

    @staticmethod
    def _wait_limit(deadline: float | None, batcher: DynamicBatcher) -> float | None:
        """When the work must reach compute: the call's deadline, or queue_timeout from now.

        Taken at admission, so the queue timeout bounds the whole wait before compute
        (preprocessing pool and batch queue), not only the batch queue.
        """
        timeout = batcher.config.queue_timeout_s
        if timeout <= 0:
            return deadline
        limit = time.monotonic() + timeout
        return limit if deadline is None else min(deadline, limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def refusals_ended(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until no request was refused as not ready for `quiet_s`; False on timeout.

        While draining, calls that already reached the transport are refused with UNAVAILABLE
        (retryable). Closing the port only once they stop arriving keeps calls that were
        received but not yet dispatched from being cancelled by the transport's shutdown.
        """
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            self._refused.clear()
            try:
                await asyncio.wait_for(self._refused.wait(), min(quiet_s, left))
            except TimeoutError:
                return True
        return False

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no admitted request is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- encode ------------------------------------------------------------------------------
    async def encode_images(
        self, images: Sequence[ImageInput], deadline: float | None, field: str = "images"
    ) -> np.ndarray:
        """Images -> normalised embeddings [N, D]."""
        self._check_count(len(images), field)
        expires = self._wait_limit(deadline, self.vision)
        with _timing_input(), self._admit_images(len(images)):
            tensors = await self._prepare_images(images, field, expires)
        return await self._embed(self.vision, tensors, expires)

    async def encode_texts(
        self, texts: Sequence[str], deadline: float | None, *, truncate: bool = True,
        field: str = "texts",
    ) -> tuple[np.ndarray, list[int]]:
        """Texts -> (normalised embeddings [N, D], token count per text)."""
        self._check_count(len(texts), field)
        expires = self._wait_limit(deadline, self.text)
        with _timing_input():
            ids = await self._tokenize(texts, truncate, field)
        embeddings = await self._embed(self.text, ids, expires)
        return embeddings, [len(i) for i in ids]

    async def encode_token_ids(
        self, ids: np.ndarray, deadline: float | None, field: str = "input_ids"
    ) -> np.ndarray:
        """Token ids [N, L] (the tokenizer's, padded or not) -> normalised embeddings [N, D].

        Each row is cut after its first end-of-text token (or, without one, before its trailing
        padding): the text tower attends causally and pools at the end-of-text position, so what
        follows it does not change the embedding, and the rows batch by their real length like
        tokenized texts. Ids outside the vocabulary are refused here, naming the row, because
        the engine would fail the whole shared batch on them.
        """
        if ids.ndim != 2:
            raise InvalidInput(f"{field} must be [batch, length], got shape {list(ids.shape)}")
        self._check_count(ids.shape[0], field)
        with _timing_input():
            rows = self._token_rows(ids, field)
        return await self._embed(self.text, rows, deadline)

    def _token_rows(self, ids: np.ndarray, field: str) -> list[np.ndarray]:
        tok = self.manifest.tokenizer
        n, length = ids.shape
        if not 1 <= length <= tok.context_length:
            raise InvalidInput(
                f"{field} rows have {length} tokens; the model accepts 1 to {tok.context_length}"
            )
        # CLIP's BPE vocabulary ends with its start- and end-of-text tokens
        vocabulary = max(tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) + 1
        bad = (ids < 0) | (ids >= vocabulary)  # [N, L]
        if bad.any():
            row = int(bad.any(axis=1).argmax())
            value = int(ids[row][bad[row]][0])
            raise InvalidInput(
                f"token id {value} is outside the vocabulary (0 to {vocabulary - 1})",
                item=f"{field}[{row}]",
            )
        ids = ids.astype(np.int64, copy=False)
        is_eot = ids == tok.eot_token_id  # [N, L]
        real = ids != tok.pad_token_id  # [N, L]
        last_real = length - real[:, ::-1].argmax(axis=1)  # [N] one past the last non-pad id
        lengths = np.where(
            is_eot.any(axis=1), is_eot.argmax(axis=1) + 1, np.where(real.any(axis=1), last_real, 1)
        )
        return [ids[i, : lengths[i]] for i in range(n)]

    async def _embed(
        self, batcher: DynamicBatcher[np.ndarray, np.ndarray], values: list[np.ndarray],
        deadline: float | None,
    ) -> np.ndarray:
        futures = batcher.submit(values, deadline)
        if len(futures) == 1:  # no gather, no stack: a lone item is the common call
            row = await futures[0]  # cancelled with the caller, which frees its batch slot
            return row.astype(np.float32, copy=False)[None, :]
        try:
            rows = await asyncio.gather(*futures)
        finally:  # the caller left or one item failed: free the others' batch slots
            for future in futures:
                future.cancel()
        # [N, D]
        return np.stack(rows).astype(np.float32, copy=False)

    async def _prepare_images(
        self, images: Sequence[ImageInput], field: str, deadline: float | None
    ) -> list[np.ndarray]:
        results: list[np.ndarray | BaseException | None] = [None] * len(images)
        jobs, slots = [], []
        for i, image in enumerate(images):
            item = f"{field}[{i}]"
            if not (isinstance(image, TensorImage) and image.dtype == "float32"):
                # decoding, or converting float16 (~0.2 ms at 224 px): the pool
                jobs.append(self._prepare_async(image, item, deadline))
                slots.append(i)
                continue
            # A float32 tensor is a view of the request's bytes and a finiteness check (~15 us
            # at 224 px): cheaper here than a round trip through the pool, and a fraction of
            # what receiving it already cost the loop.
            try:
                results[i] = self._prepare_one(image, item, deadline)
            except Exception as exc:  # as gather would: the pool's jobs still run and are awaited
                results[i] = exc
        if jobs:
            done = await asyncio.gather(*jobs, return_exceptions=True)
            for i, result in zip(slots, done, strict=True):
                results[i] = result
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = errors[0]
            if not isinstance(first, ClipServeError):
                raise first
            if len(errors) > 1:
                raise type(first)(
                    f"{first.detail} (and {len(errors) - 1} more failed item(s))", item=first.item
                )
            raise first
        return list(results)  # type: ignore[arg-type]

    async def _prepare_async(
        self, image: ImageInput, item: str, expires: float | None
    ) -> np.ndarray:
        """Fetch a URL input (on the loop, bounded), then decode on the pool."""
        if isinstance(image, UrlImage) and self._fetcher is not None:
            try:
                image = EncodedImage(await self._fetcher.fetch(image.url, expires))
            except ClipServeError as exc:
                raise exc.at(item) from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._prepare_one, image, item, expires)

    def _prepare_one(
        self, image: ImageInput, item: str, expires: float | None = None
    ) -> np.ndarray:
        """One image -> float32 [3, S, S]; errors name the item."""
        try:
            if expires is not None and time.monotonic() >= expires:  # skip work nobody awaits
                raise DeadlineExpired(
                    "the queue timeout or the call's deadline passed before preprocessing"
                )
            if isinstance(image, EncodedImage):
                return self.preprocessor.decode(image.data)
            if isinstance(image, TensorImage):
                return self.preprocessor.from_tensor(
                    image.shape, image.dtype, image.data, copy=False
                )
            if isinstance(image, UrlImage):
                raise Forbidden("URL inputs are disabled on this server")
            raise InvalidInput("no image data (set data, tensor or url)")
        except ClipServeError as exc:
            raise exc.at(item) from None

    async def _tokenize(self, texts: Sequence[str], truncate: bool, field: str) -> list[np.ndarray]:
        try:
            if len(texts) <= INLINE_TOKENIZE_TEXTS and (
                sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS
            ):  # cheaper than the hand-off to the pool and back (measured: 15 vs 200 us CPU)
                return self.tokenizer.encode_batch(list(texts), truncate)  # type: ignore[no-any-return]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool, self.tokenizer.encode_batch, list(texts), truncate
            )
        except ClipServeError as exc:
            if exc.item and exc.item.startswith("texts[") and field != "texts":
                raise exc.at(field + exc.item[len("texts"):]) from None
            raise

    def _check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise InvalidInput(f"{field} is empty: send at least one item")
        if n > self.limits.max_items_per_request:
            raise InvalidInput(
                f"{field} has {n} items, above the limit of {self.limits.max_items_per_request} "
                "(max_items_per_request): split the request"
            )

    # -- classify ----------------------------------------------------------------------------
    async def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        templates: Sequence[str],
        top_k: int | None,
        deadline: float | None,
    ) -> list[list[Scored]]:
        """Per image, labels best first: softmax(logit_scale * cosine + bias) and cosine."""
        self._check_count(len(images), "images")
        self._check_labels(labels)
        templates = tuple(templates) or self.manifest.default_templates
        self._check_templates(templates)
        k = self._check_top_k(top_k, len(labels), "labels")
        image_task = asyncio.ensure_future(self.encode_images(images, deadline))
        try:
            label_embeddings = await self.label_embeddings(labels, templates, deadline)
            image_embeddings = await image_task
        finally:
            image_task.cancel()
        # [N_images, N_labels]
        cosine = image_embeddings @ label_embeddings.T
        probabilities = self._softmax(cosine)
        return [self._top(cosine[i], probabilities[i], k) for i in range(len(images))]

    async def label_embeddings(
        self, labels: Sequence[str], templates: tuple[str, ...], deadline: float | None
    ) -> np.ndarray:
        """[N_labels, D] (read-only): per label the normalised mean of its templates' text
        embeddings."""
        set_key = (templates, tuple(labels))
        matrix = self.label_cache.get_set(set_key)
        if matrix is not None:
            return matrix
        keys: list[Hashable] = [(templates, label) for label in labels]
        cached = self.label_cache.get_many(keys)
        missing = [i for i, value in enumerate(cached) if value is None]
        if missing:
            texts = [t.replace("{}", labels[i]) for i in missing for t in templates]
            window = self.limits.max_items_per_request
            parts = []
            for start in range(0, len(texts), window):  # fair: other requests interleave
                chunk, _ = await self.encode_texts(
                    texts[start : start + window], deadline, field="labels"
                )
                parts.append(chunk)
            # [N_missing, N_templates, D] -> mean over templates -> renormalise
            per_label = np.concatenate(parts).reshape(len(missing), len(templates), -1).mean(1)
            per_label /= np.linalg.norm(per_label, axis=1, keepdims=True)
            self.label_cache.put_many((keys[i], per_label[j]) for j, i in enumerate(missing))
            for j, i in enumerate(missing):
                cached[i] = per_label[j]
        stacked = np.stack(cached).astype(np.float32, copy=False)  # type: ignore[arg-type]
        return self.label_cache.put_set(set_key, stacked)

    def _check_labels(self, labels: Sequence[str]) -> None:
        if not labels:
            raise InvalidInput("labels is empty: send at least one candidate label")
        if len(labels) > self.limits.max_labels:
            raise InvalidInput(
                f"labels has {len(labels)} items, above the limit of {self.limits.max_labels} "
                "(max_labels)"
            )
        seen: dict[str, int] = {}
        for i, label in enumerate(labels):
            if not label.strip():
                raise InvalidInput("label is empty", item=f"labels[{i}]")
            if label in seen:
                raise InvalidInput(
                    f"duplicate of labels[{seen[label]}] ({label!r}): labels must be unique",
                    item=f"labels[{i}]",
                )
            seen[label] = i

    def _check_templates(self, templates: Sequence[str]) -> None:
        if len(templates) > self.limits.max_templates:
            raise InvalidInput(
                f"templates has {len(templates)} items, above the limit of "
                f"{self.limits.max_templates} (max_templates)"
            )
        for i, template in enumerate(templates):
            if template.count("{}") != 1:
                raise InvalidInput(
                    f"template {template!r} must contain exactly one '{{}}' for the label",
                    item=f"templates[{i}]",
                )

    @staticmethod
    def _check_top_k(top_k: int | None, count: int, field: str) -> int:
        if top_k is None:
            return count
        if not 1 <= top_k <= count:
            raise InvalidInput(f"top_k is {top_k}; it must be between 1 and {count} ({field})")
        return top_k

    # -- rank --------------------------------------------------------------------------------
    async def rank(
        self,
        query: RankInput | None,
        candidates: Sequence[RankInput],
        top_k: int | None,
        deadline: float | None,
    ) -> list[Scored]:
        """Candidates ordered by cosine to the query, with softmax probabilities."""
        if query is None:
            raise InvalidInput("query is empty: set a text or an image")
        self._check_count(len(candidates), "candidates")
        k = self._check_top_k(top_k, len(candidates), "candidates")
        (query_embedding, _), (candidate_embeddings, _) = await asyncio.gather(
            self.encode_mixed([query], deadline, "query"),
            self.encode_mixed(candidates, deadline, "candidates"),
        )
        # [N_candidates]
        cosine = candidate_embeddings @ query_embedding[0]
        return self._top(cosine, self._softmax(cosine[None, :])[0], k)

    async def encode_mixed(
        self, items: Sequence[RankInput], deadline: float | None, field: str
    ) -> tuple[np.ndarray, list[int]]:
        """Texts and images in one list -> (normalised embeddings [N, D] in list order, token
        count per item: a text's as in `encode_texts`, 0 for an image).

        Texts go to the text tower and images to the vision tower at once; errors name the
        item by its position in `items` (``field[i]``, or `field` alone for ``query``).
        """
        self._check_count(len(items), field)
        text_at = [i for i, item in enumerate(items) if isinstance(item, str)]
        image_at = [i for i, item in enumerate(items) if not isinstance(item, str)]
        out = np.empty((len(items), self.manifest.embedding_dim), dtype=np.float32)
        counts = [0] * len(items)
        jobs = []
        if text_at:
            jobs.append(self._embed_texts_at(items, text_at, deadline, field, out, counts))
        if image_at:
            jobs.append(self._embed_images_at(items, image_at, deadline, field, out))
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        finally:  # one tower failed or the caller left: stop the other tower's work too
            for task in tasks:
                task.cancel()
        return out, counts

    async def _embed_texts_at(self, items: Sequence[RankInput], at: list[int],
                              deadline: float | None, field: str, out: np.ndarray,
                              counts: list[int]) -> None:
        texts = [items[i] for i in at]
        try:
            embeddings, tokens = await self.encode_texts(texts, deadline, field="texts")  # type: ignore[arg-type]
        except ClipServeError as exc:
            raise self._reattribute(exc, at, field) from None
        out[at] = embeddings
        for i, n in zip(at, tokens, strict=True):
            counts[i] = n

    async def _embed_images_at(self, items: Sequence[RankInput], at: list[int],
                               deadline: float | None, field: str, out: np.ndarray) -> None:
        images = [items[i] for i in at]
        try:
            embeddings = await self.encode_images(images, deadline, field="images")  # type: ignore[arg-type]
        except ClipServeError as exc:
            raise self._reattribute(exc, at, field) from None
        out[at] = embeddings

    @staticmethod
    def _reattribute(exc: ClipServeError, at: list[int], field: str) -> ClipServeError:
        """Map `texts[j]`/`images[j]` of a sub-list back to `candidates[at[j]]`."""
        if exc.item and "[" in exc.item:
            j = int(exc.item[exc.item.index("[") + 1 : exc.item.index("]")])
            name = field if field == "query" else f"{field}[{at[j]}]"
            return exc.at(name)
        return exc

    # -- scoring -----------------------------------------------------------------------------
    def _softmax(self, cosine: np.ndarray) -> np.ndarray:
        # [N, M] -> row-wise softmax of logit_scale * cosine + bias (float64 for stability)
        logits = cosine.astype(np.float64) * self.manifest.logit_scale
        if self.manifest.logit_bias is not None:
            logits += self.manifest.logit_bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    @staticmethod
    def _top(cosine: np.ndarray, probabilities: np.ndarray, k: int) -> list[Scored]:
        order = np.argsort(-cosine, kind="stable")[:k]
        return [Scored(int(i), float(probabilities[i]), float(cosine[i])) for i in order]

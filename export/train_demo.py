"""Train the `clipserve-demo` CLIP on generated shapes-and-colours image–caption pairs.

Usage::

    python -m clipserve.export.train_demo --output export/demo/clipserve_demo.safetensors

The loss is CLIP's symmetric InfoNCE between image and caption embeddings. A batch may hold
several pairs of one class; those are all counted as positives (the targets are spread uniformly
over them), which equals open_clip's `ClipLoss` when the classes of a batch all differ.

What makes it fit in a few CPU minutes, without changing what the served model computes:

* The patch embedding (`conv1`) is fixed, not learned: token channel ``16c + 4i + j`` is the
  mean of colour channel c over the 8 x 8 px sub-block (i, j) of the token's 32 x 32 patch, the
  other channels are zero (`init_patch_embedding`). With the fixed 2-D sin-cos position
  embedding of the config, a token starts out as a tiny picture of its patch and its place.
  Learning a 3072 -> width projection from scratch is what makes small ViTs slow to learn shapes.
* Because `conv1` is fixed, its output is computed once per training image (and its mirror
  image) and the training steps start from it (`patches_as_input`): exactly the full model's
  computation, minus the convolution.
* The images are rendered once and passed through open_clip's own val transform (the served
  path); see `clipserve.export.demo_data`.
* Captions are at most 12 tokens: the text tower runs on the first 12 positions
  (`encode_text_short`, equal to the full 77 because attention is causal), and only the
  token-embedding rows the captions use are trained (`CompactVocab`; Adam leaves rows without
  gradient unchanged, so this equals training the whole 49408-row table).

Training runs on one torch thread by default: the steps are small, and on a shared CPU a second
thread mostly spins. The run is deterministic for a given seed, thread count, torch version and
CPU (same checkpoint bytes): per-item random streams for the data, a seeded torch generator for
batches, caption templates and flips, and ``torch.use_deterministic_algorithms(True)``.
Measured figures and how to rebuild: docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional

from clipserve import synthetic

from .demo_data import caption_tokens, normalize_batch, render_split
from .demo_eval import zero_shot_eval_torch
from .models import DEMO_MODEL, load_demo_model, register_builtin_configs

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)
# The arguments the trained weights depend on, recorded in the checkpoint (logging, evaluation
# and the number of rendering processes change nothing in it).
RESULT_ARGS = (
    "seed", "steps", "batch_size", "images_per_class", "lr", "weight_decay", "warmup", "threads"
)
SUB_GRID = 4  # the fixed patch embedding averages a SUB_GRID x SUB_GRID grid of sub-blocks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clipserve.export.train_demo",
        description=f"Train the {DEMO_MODEL} CLIP on generated shapes and colours.",
    )
    parser.add_argument("--output", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and batches")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=72, help="pairs per step")
    parser.add_argument(
        "--images-per-class", type=int, default=60, help="distinct training images per class"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument(
        "--eval-images", type=int, default=1008,
        help="held-out images of the final evaluation (0: skip it)",
    )
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out images")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (the steps are small: on a shared CPU more threads mostly spin); "
        "results are bit-identical only for the same count",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="processes rendering the training images"
    )
    parser.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    parser.add_argument(
        "--eval-every", type=int, default=0,
        help="steps between zero-shot checks on a small held-out set (0: none)",
    )
    parser.add_argument(
        "--monitor-images", type=int, default=288, help="held-out images of those checks"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser.parse_args(argv)


# --- vision tower ---------------------------------------------------------------------------


def init_patch_embedding(visual: nn.Module) -> None:
    """Fix `visual.conv1` to per-colour means over a 4 x 4 grid of sub-blocks; freeze it."""
    weight = visual.conv1.weight  # [width, 3, P, P]
    width, channels, patch, _ = weight.shape
    sub = patch // SUB_GRID
    if patch % SUB_GRID or width < channels * SUB_GRID * SUB_GRID:
        raise ValueError(f"patch {patch} / width {width} do not fit a {SUB_GRID}x{SUB_GRID} grid")
    with torch.no_grad():
        weight.zero_()
        for c in range(channels):
            for i in range(SUB_GRID):
                for j in range(SUB_GRID):
                    k = (c * SUB_GRID + i) * SUB_GRID + j
                    weight[k, c, i * sub:(i + 1) * sub, j * sub:(j + 1) * sub] = 1.0 / sub**2
    weight.requires_grad_(False)


@torch.no_grad()
def patch_features(visual: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """`visual.conv1` of uint8 images and of their mirror images: [N, 2, width, g, g]."""
    out = []
    for start in range(0, len(images), batch):
        pixels = normalize_batch(images[start:start + batch])  # [b, 3, S, S]
        plain = visual.conv1(pixels)  # [b, width, g, g]
        mirrored = visual.conv1(pixels.flip(-1))  # [b, width, g, g]
        out.append(torch.stack([plain, mirrored], dim=1))  # [b, 2, width, g, g]
    return torch.cat(out)


@contextmanager
def patches_as_input(visual: nn.Module) -> Iterator[None]:
    """Within the block the vision tower takes `conv1`'s output instead of pixels."""
    conv1 = visual.conv1
    visual.conv1 = nn.Identity()
    try:
        yield
    finally:
        visual.conv1 = conv1


# --- text tower -----------------------------------------------------------------------------


class CompactVocab:
    """Swap the token embedding for one holding only the rows `tokens` use, and back.

    The used ids are kept in ascending order, so the end-of-text token (the largest id) is still
    the largest compact id and open_clip's argmax pooling still finds it.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor) -> None:
        self.model = model
        self.full: nn.Embedding = model.token_embedding
        self.used = torch.unique(tokens)  # [V'] sorted ascending
        self.lookup = torch.full((self.full.num_embeddings,), -1, dtype=torch.long)  # [V]
        self.lookup[self.used] = torch.arange(len(self.used))
        self.compact = nn.Embedding(len(self.used), self.full.embedding_dim)
        with torch.no_grad():
            self.compact.weight.copy_(self.full.weight[self.used])
        model.token_embedding = self.compact

    def remap(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> compact ids; every id must be one of the used ones."""
        compact = self.lookup[tokens]
        if bool((compact < 0).any()):
            raise ValueError("token ids outside the compact vocabulary")
        return compact

    def restore(self) -> None:
        """Write the trained rows back into the full table and put it back in the model."""
        with torch.no_grad():
            self.full.weight[self.used] = self.compact.weight
        self.model.token_embedding = self.full


def encode_text_short(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised `model.encode_text` of tokens cut to their first L <= context positions.

    Equal to encoding the full padded tokens: attention is causal and the feature is read at the
    end-of-text token, inside the first L positions, so the padding after it never contributes.
    """
    length = tokens.shape[1]
    x = model.token_embedding(tokens)  # [B, L, width]
    x = x + model.positional_embedding[:length]  # [B, L, width]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])  # [B, L, width]
    x = model.ln_final(x)  # [B, L, width]
    x = text_global_pool(x, tokens, model.text_pool_type)  # [B, width] at end-of-text
    projection = model.text_projection
    x = projection(x) if isinstance(projection, nn.Linear) else x @ projection  # [B, D]
    return functional.normalize(x, dim=-1)


# --- training -------------------------------------------------------------------------------


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss with every same-class pair of the batch counted as a positive."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)  # [B, B], symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # [B, B], rows sum to 1
    image_loss = functional.cross_entropy(logits, targets)
    text_loss = functional.cross_entropy(logits.T, targets)
    return (image_loss + text_loss) / 2


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices only: not gains, biases, embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_schedule(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Index batches of `steps` steps: shuffled epochs, each dropping its last partial batch."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)  # [n]
        batches.extend(order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return batches[:steps]


class Monitor:
    """Zero-shot top-1 on a small pre-rendered held-out set, for the progress lines."""

    def __init__(self, patches: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor) -> None:
        self.patches = patches  # [M, width, g, g] conv1 output
        self.labels = labels  # [M]
        self.prompts = prompts  # [C, L] compact ids of the zero-shot prompts

    @torch.no_grad()
    def top1(self, model: nn.Module) -> float:
        model.eval()
        classifier = encode_text_short(model, self.prompts)  # [C, D]
        features = model.encode_image(self.patches, normalize=True)  # [M, D]
        predicted = (features @ classifier.T).argmax(dim=1)  # [M]
        model.train()
        return float((predicted == self.labels).float().mean())


# The two large tables, stored as float16 so that the file stays well under 10 MB: the token
# embedding (49408 x width, only the caption tokens' rows trained) and the fixed patch embedding
# (its values, 0 and 1/64, are exact in float16). Everything else stays float32.
FLOAT16_TENSORS = ("token_embedding.weight", "visual.conv1.weight")


def save_checkpoint(model: nn.Module, path: Path, provenance: dict[str, Any]) -> None:
    """Write the state dict as safetensors (`FLOAT16_TENSORS` in float16, the rest float32).

    open_clip's loader copies the float16 tensors into the float32 model. `provenance` goes
    into the file's metadata as one sorted JSON string under "clipserve": safetensors writes
    several metadata keys in a random order, which would make rebuilds differ byte-wise.
    """
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().contiguous()
        if name in FLOAT16_TENSORS:
            value = value.to(torch.float16)
        tensors[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"clipserve": json.dumps(provenance, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def _prepare_text(
    model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]
) -> tuple[CompactVocab, torch.Tensor, torch.Tensor]:
    """Compact vocabulary, caption tokens [C, T, L] and zero-shot prompt tokens [C, L]."""
    tokens = caption_tokens(tokenizer)  # [C, T, context]
    vocab = CompactVocab(model, tokens)
    captions = vocab.remap(tokens)  # [C, T, context]
    length = int((captions != 0).sum(dim=-1).max())
    if bool((captions[..., length:] != 0).any()):
        raise RuntimeError("caption tokens are not left-aligned")
    with torch.no_grad():  # guard against open_clip internals changing
        full = model.encode_text(captions[:, 0], normalize=True)  # [C, D]
        if not torch.allclose(full, encode_text_short(model, captions[:, 0, :length]), atol=1e-5):
            raise RuntimeError("encode_text_short no longer matches open_clip's encode_text")
    prompts = [synthetic.ZERO_SHOT_TEMPLATES[0].format(name) for name in synthetic.CLASSES]
    prompt_tokens = vocab.remap(tokenizer(prompts))[:, :length]  # [C, L]
    logger.info("captions use %d of %d tokens and %d positions", len(vocab.used),
                vocab.full.num_embeddings, length)
    return vocab, captions[..., :length], prompt_tokens


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count within the block; restored after."""
    deterministic = torch.utils.deterministic  # type: ignore[attr-defined]
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        deterministic.fill_uninitialized_memory,
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised
    # memory): a quarter of the step time here, and no source of nondeterminism.
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        deterministic.fill_uninitialized_memory = saved[3]


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, write the checkpoint and evaluate it; return the measured figures."""
    with deterministic_torch(args.threads):
        return _train(args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    register_builtin_configs()

    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL, load_weights=False)
    model.train()
    init_patch_embedding(model.visual)
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    vocab, captions, prompt_tokens = _prepare_text(model, tokenizer)

    n_train = args.images_per_class * len(synthetic.CLASSES)
    images, labels = render_split(preprocess, "train", n_train, args.seed, args.workers)
    patches = patch_features(model.visual, images)  # [N, 2, width, g, g]
    with torch.no_grad():  # the shortcut must equal the full model
        expected = model.encode_image(normalize_batch(images[:4]))  # [4, D]
        with patches_as_input(model.visual):
            if not torch.allclose(model.encode_image(patches[:4, 0]), expected, atol=1e-5):
                raise RuntimeError("vision tower on patch features differs from it on pixels")
    del images
    logger.info("rendered %d training images in %.1fs", n_train, time.perf_counter() - start)

    monitor = None
    if args.eval_every > 0:
        held, held_labels = render_split(
            preprocess, "heldout", args.monitor_images, args.eval_seed + 1, args.workers
        )
        monitor = Monitor(patch_features(model.visual, held)[:, 0], held_labels, prompt_tokens)

    optimizer = torch.optim.AdamW(
        _param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_schedule(args.warmup, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    batches = _batches(n_train, args.batch_size, args.steps, generator)

    train_start = time.perf_counter()
    with patches_as_input(model.visual):
        for step, index in enumerate(batches):
            batch_labels = labels[index]  # [B]
            flip = torch.randint(2, (len(index),), generator=generator)  # [B]
            inputs = patches[index, flip]  # [B, width, g, g]
            template = torch.randint(captions.shape[1], (len(index),), generator=generator)
            tokens = captions[batch_labels, template]  # [B, L]

            image_features = model.encode_image(inputs, normalize=True)  # [B, D]
            text_features = encode_text_short(model, tokens)  # [B, D]
            loss = clip_loss(image_features, text_features, model.logit_scale.exp(), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                logger.info("step %d/%d loss %.4f logit_scale %.2f lr %.2e elapsed %.1fs",
                            done, args.steps, loss.item(), model.logit_scale.exp().item(),
                            scheduler.get_last_lr()[0], time.perf_counter() - start)
            if monitor is not None and (done % args.eval_every == 0 or done == args.steps):
                logger.info("step %d/%d monitor zero-shot top-1 %.3f on %d held-out images",
                            done, args.steps, monitor.top1(model), len(monitor.labels))
    train_seconds = time.perf_counter() - train_start

    vocab.restore()
    model.eval()
    provenance = {
        "model": DEMO_MODEL,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "train_args": {name: getattr(args, name) for name in RESULT_ARGS},
    }
    save_checkpoint(model, args.output, provenance)
    total_seconds = time.perf_counter() - start
    size = args.output.stat().st_size
    logger.info("wrote %s (%d bytes) after %.1fs (%.1fs in the training loop)",
                args.output, size, total_seconds, train_seconds)
    summary: dict[str, Any] = {
        "train_seconds_total": round(total_seconds, 1),
        "train_seconds_loop": round(train_seconds, 1),
        "checkpoint_bytes": size,
    }
    if args.eval_images <= 0:
        return summary

    # Held-out evaluation of the file as written (float16 matrices), loaded by open_clip.
    loaded, loaded_preprocess = load_demo_model(args.output)
    result = zero_shot_eval_torch(
        loaded, loaded_preprocess, tokenizer, args.eval_images, args.eval_seed
    )
    logger.info("held-out zero-shot top-1 %.2f%% (%d/%d), top-5 %.2f%%, logit scale %.2f",
                100 * result["top1"], result["correct"], result["n"], 100 * result["top5"],
                result["logit_scale"])
    summary.update(
        heldout_top1=result["top1"],
        heldout_top5=result["top5"],
        heldout_n=result["n"],
        logit_scale=result["logit_scale"],
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    summary = train(args)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

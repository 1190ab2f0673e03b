"""Image preprocessing throughput and parity: open_clip's transform vs clipserve's.

Encoded JPEG bytes -> normalised float32 [3, S, S] tensor, one image at a time on one thread,
for 640x480 and 1920x1080 JPEGs (quality 90). Throughput is images per CPU-second of this
process ("per core": every thread's time, any helper thread a library starts included; torch
runs on one thread), which stays meaningful on a shared machine; wall-clock figures are
printed too. The implementations take turns within each round so that background load hits
them alike, and the median round is reported.

Two image sets: "photos" (four skimage photos resized to the size: smooth, as most uploads)
and "detail" (mosaics of native-resolution crops of skimage photos and textures: hard edges and
fine texture, the worst case for fast mode). Throughput is measured on the photos. Parity is the
mean absolute difference to open_clip's output in 8-bit pixel units, i.e.
``mean(|ours - ref| * std) * 255`` over all values of the un-normalised tensors, averaged over
the photos ("mean"); "worst" is the largest per-image value of each set.

    .venv/bin/python benchmarks/bench_preprocess.py [--rounds 7] [--seconds 1.0] [--json]

Rows: open_clip, clipserve's exact path (the default), its SIMD path (``--preprocess-simd``;
left out, with a note, when the ``simd`` extra is not installed) and its fast mode (draft
decoding). ``--json`` prints one JSON object instead of the table (`clipserve bench` reads it).
``--diagnose`` (``shortest`` only) adds two rows that say where fast mode's parity goes: a full
decode, Pillow's 2x box ``reduce`` and then the same resize ("full + reduce 2"), which is the
2x pre-reduction of a 1/2-scale draft without libjpeg's DCT scaling; and a full decode resized
in float32 and rounded once ("full, float resize"), the error of exact resampling without
Pillow's 8-bit intermediate: the floor that any other resampler starts from.

Needs the export/test extras (torch, open_clip_torch, scikit-image); the server does not.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from skimage import data as skdata

from clipserve.repository import Preprocess
from clipserve.server.preprocess import ImagePreprocessor, plan_geometry

# open_clip's ViT-L-14 datacomp_xl_s13b_b90k preprocessing (the OpenAI CLIP constants).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SIZES = ((640, 480), (1920, 1080))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photos(width: int, height: int) -> list[bytes]:
    return [
        jpeg(Image.fromarray(getattr(skdata, name)()).resize((width, height), Image.BICUBIC))
        for name in PHOTOS
    ]


def detail(width: int, height: int, seed: int) -> bytes:
    """A mosaic of 240x180 native-resolution crops: the hardest content for fast mode."""
    rng = np.random.default_rng(seed)
    grey = [np.repeat(f()[..., None], 3, axis=2) for f in (skdata.gravel, skdata.grass)]
    sources = [skdata.hubble_deep_field(), skdata.retina(), skdata.coffee(), *grey]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    for top in range(0, height, 180):
        for left in range(0, width, 240):
            src = sources[rng.integers(len(sources))]
            y, x = rng.integers(src.shape[0] - 180), rng.integers(src.shape[1] - 240)
            tile = src[y : y + 180, x : x + 240, :3]
            h, w = min(180, height - top), min(240, width - left)
            canvas[top : top + h, left : left + w] = tile[:h, :w]
    return jpeg(Image.fromarray(canvas))


class Diagnostic:
    """Full-size JPEG decode, then either Pillow's 2x box reduce and the same 8-bit resize, or
    one float32 resize rounded once; normalised like the served path (``shortest`` only)."""

    def __init__(self, cfg: Preprocess, *, reduce: bool) -> None:
        if cfg.resize_mode != "shortest":
            raise SystemExit("--diagnose measures the shortest-side resize only")
        self.cfg, self.reduce = cfg, reduce
        self.resample = Image.Resampling[cfg.interpolation.upper()]
        self.mean = np.asarray(cfg.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg.std, np.float32).reshape(3, 1, 1)

    def __call__(self, data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        geo = plan_geometry(*img.size, self.cfg.size, self.cfg.resize_mode)
        if self.reduce:  # reduced pixel i covers source pixels 2i and 2i + 1
            x0, y0, x1, y1 = geo.box
            img, box = img.reduce(2), (x0 / 2, y0 / 2, x1 / 2, y1 / 2)
            pixels = np.asarray(img.resize(geo.size, self.resample, box=box)).transpose(2, 0, 1)
        else:
            planes = [
                np.asarray(c.convert("F").resize(geo.size, self.resample, box=geo.box))
                for c in img.split()
            ]
            pixels = np.clip(np.rint(np.stack(planes)), 0, 255)  # [3, S, S]
        return (pixels.astype(np.float32) / 255.0 - self.mean) / self.std


def pixel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean |ours - ref| in 8-bit pixel units (normalised values scaled back by std * 255)."""
    std = np.asarray(STD, dtype=np.float64).reshape(3, 1, 1)
    return float(np.mean(np.abs(ours.astype(np.float64) - ref) * std) * 255.0)


def rate(fn: Callable[[bytes], object], images: list[bytes], seconds: float) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of ``fn`` over ``images``, repeated.

    CPU time is the process's, not the thread's: a library that hands work to its own threads
    must not look cheaper than it is.
    """
    count = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        for data in images:
            fn(data)
        count += len(images)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if wall >= seconds:
            return count / max(cpu, 1e-9), count / wall


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Every implementation at every size: per-core and wall rates, ratio, parity."""
    torch.set_num_threads(1)
    cfg = Preprocess(args.size, MEAN, STD, args.interpolation, args.resize_mode)
    reference = image_transform_v2(
        PreprocessCfg(
            size=args.size,
            mean=MEAN,
            std=STD,
            interpolation=args.interpolation,
            resize_mode=args.resize_mode,
        ),
        is_train=False,
    )
    exact = ImagePreprocessor(cfg)
    fast = ImagePreprocessor(cfg, fast=True)
    impls: dict[str, Callable[[bytes], object]] = {
        "open_clip": lambda b: reference(Image.open(io.BytesIO(b))),
        "clipserve exact": exact.decode,
    }
    missing, simd_versions = "", {}
    try:
        simd = ImagePreprocessor(cfg, simd=True)
    except RuntimeError as exc:  # the simd extra is not installed
        missing = str(exc)
    else:
        impls["clipserve simd"] = simd.decode
        simd_versions = simd.simd_versions
    impls["clipserve fast"] = fast.decode
    if args.diagnose:
        impls["full + reduce 2"] = Diagnostic(cfg, reduce=True)
        impls["full, float resize"] = Diagnostic(cfg, reduce=False)
    rows = []
    for width, height in args.sizes:
        images = photos(width, height)
        hard = [detail(width, height, seed) for seed in range(2)]
        refs = [reference(Image.open(io.BytesIO(b))).numpy() for b in images]
        hard_refs = [reference(Image.open(io.BytesIO(b))).numpy() for b in hard]
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                rounds[name].append(rate(fn, images, args.seconds))
        base = statistics.median(r[0] for r in rounds["open_clip"])
        for name, fn in impls.items():
            cpu = statistics.median(r[0] for r in rounds[name])
            wall = statistics.median(r[1] for r in rounds[name])
            errors = [pixel_error(np.asarray(fn(b)), r) for b, r in zip(images, refs, strict=True)]
            worst = max(
                pixel_error(np.asarray(fn(b)), r) for b, r in zip(hard, hard_refs, strict=True)
            )
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "implementation": name,
                    "per_core": cpu,
                    "wall": wall,
                    "vs_open_clip": cpu / base,
                    "parity_mean": statistics.fmean(errors),
                    "parity_worst": max(errors),
                    "detail_worst": worst,
                }
            )
    return {
        "versions": {
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
            "Pillow": Image.__version__,
            "numpy": np.__version__,
            **simd_versions,
        },
        "rounds": args.rounds,
        "seconds": args.seconds,
        "rows": rows,
        "simd_missing": missing,
    }


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per implementation per round")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize-mode", default="shortest")
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument(
        "--sizes", type=_size, nargs="+", default=list(SIZES), metavar="WxH",
        help="JPEG sizes (default: 640x480 1920x1080)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--diagnose", action="store_true",
        help="add two rows that locate fast mode's parity loss (see the module docstring)",
    )
    args = parser.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return
    v = result["versions"]
    simd_text = "".join(f", {k} {v[k]}" for k in ("simplejpeg", "libvips") if k in v)
    print(
        f"open_clip {v['open_clip']}, torch {v['torch']}, Pillow {v['Pillow']},"
        f" numpy {v['numpy']}{simd_text}; size={args.size} resize_mode={args.resize_mode}"
        f" interpolation={args.interpolation}; {args.rounds} rounds x {args.seconds:.1f} s"
    )
    if result["simd_missing"]:
        print(f"no 'clipserve simd' row: {result['simd_missing']}")
    header = f"{'JPEG':>10}  {'implementation':<18} {'img/s/core':>10} {'img/s wall':>10}"
    print(header + f" {'vs open_clip':>12} {'parity mean':>11} {'worst':>7} {'detail':>7}")
    for row in result["rows"]:
        print(
            f"{row['size']:>10}  {row['implementation']:<18} {row['per_core']:10.1f}"
            f" {row['wall']:10.1f} {row['vs_open_clip']:11.2f}x {row['parity_mean']:11.4f}"
            f" {row['parity_worst']:7.4f} {row['detail_worst']:7.4f}"
        )


if __name__ == "__main__":
    main()

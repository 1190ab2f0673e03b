"""A Triton client session against clipserve: the same calls a Triton deployment answers.

    python examples/tritonclient_session.py --url localhost:8001 [--metrics-url URL] [IMAGE ...]

Needs only `tritonclient[grpc]` and numpy (and Pillow to draw two images when none are given).
It lists the models, reads a config, embeds images and texts through the string/bytes models and
the raw-tensor towers, compares them, and prints the statistics and a few nv_* metric lines.
"""

from __future__ import annotations

import argparse
import io
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import model_config_pb2


def drawn_images() -> list[bytes]:
    """A red disc and a blue square, PNG-encoded."""
    from PIL import Image, ImageDraw

    images = []
    for shape, colour in (("ellipse", "red"), ("rectangle", "blue")):
        image = Image.new("RGB", (320, 240), "white")
        getattr(ImageDraw.Draw(image), shape)((80, 40, 240, 200), fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def infer(client: tc.InferenceServerClient, model: str, name: str, array: np.ndarray,
          datatype: str) -> np.ndarray:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor])
    output = result.get_response().outputs[0].name
    return result.as_numpy(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    parser.add_argument("--metrics-url", default="", help="e.g. http://localhost:8002/metrics")
    parser.add_argument("images", nargs="*", type=Path, help="image files (default: two drawn)")
    args = parser.parse_args()
    images = [p.read_bytes() for p in args.images] or drawn_images()
    texts = ["a red circle", "a blue square", "a photo of a dog"]

    client = tc.InferenceServerClient(args.url)
    meta = client.get_server_metadata()
    print(f"server: {meta.name} {meta.version}, extensions: {', '.join(meta.extensions)}")
    print(f"live={client.is_server_live()} ready={client.is_server_ready()}")
    for model in client.get_model_repository_index().models:
        m = client.get_model_metadata(model.name)
        tensors = [f"{t.name} {t.datatype} {list(t.shape)}" for t in (*m.inputs, *m.outputs)]
        print(f"  {model.name:18} v{model.version} {model.state:6} {m.platform:17} "
              f"{tensors[0]} -> {tensors[1]}")
    config = client.get_model_config("clip_vision").config
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
    print(f"clip_vision config: max_batch_size={config.max_batch_size} "
          f"preferred_batch_size={list(config.dynamic_batching.preferred_batch_size)} "
          f"max_queue_delay_us={config.dynamic_batching.max_queue_delay_microseconds} "
          f"instance_group={kind}")

    # bytes and strings in, server-side preprocessing and tokenisation
    image_embeds = infer(client, "clip_image_bytes", "images",
                         np.array([[b] for b in images], dtype=object), "BYTES")
    text_embeds = infer(client, "clip_text_strings", "texts",
                        np.array([[t.encode()] for t in texts], dtype=object), "BYTES")
    print(f"clip_image_bytes -> {image_embeds.shape} {image_embeds.dtype}, norms "
          f"{np.round(np.linalg.norm(image_embeds, axis=1), 4).tolist()}")
    print(f"clip_text_strings -> {text_embeds.shape}")
    print("cosine image x text:")
    for i, row in enumerate(image_embeds @ text_embeds.T):
        scores = "  ".join(f"{t!r}={c:+.3f}" for t, c in zip(texts, row, strict=True))
        print(f"  image {i}: {scores}")

    # raw tensors into the towers: a zero image as FP32 and FP16, padded token ids as INT64
    config_text = client.get_model_config("clip_text").config
    size = list(client.get_model_metadata("clip_vision").inputs[0].shape)[2:]
    pixels = np.zeros((2, 3, *size), np.float32)
    fp32 = infer(client, "clip_vision", "pixel_values", pixels, "FP32")
    fp16 = infer(client, "clip_vision", "pixel_values", pixels.astype(np.float16), "FP16")
    print(f"clip_vision FP32 vs FP16 input: max |diff| {np.abs(fp32 - fp16).max():.2e}")
    ids = np.zeros((1, 77), np.int64)
    ids[0, :2] = (49406, 49407)  # CLIP's start and end of text: the empty string
    empty = infer(client, "clip_text", "input_ids", ids, "INT64")
    same = infer(client, "clip_text_strings", "texts", np.array([[b""]], dtype=object), "BYTES")
    print(f"clip_text ids vs clip_text_strings '': max |diff| {np.abs(empty - same).max():.2e} "
          f"(clip_text parameters: "
          f"{ {k: v.string_value for k, v in sorted(config_text.parameters.items())} })")

    try:
        infer(client, "clip_vision", "pixel_values", np.zeros((1, 3, 10, 10), np.float32), "FP32")
    except tc.InferenceServerException as exc:
        print(f"wrong shape -> {exc.status()}: {exc.message()}")
    try:
        client.get_model_metadata("resnet50")
    except tc.InferenceServerException as exc:
        print(f"unknown model -> {exc.status()}: {exc.message()}")

    for s in client.get_inference_statistics().model_stats:
        i = s.inference_stats
        mean = s.inference_count / s.execution_count if s.execution_count else 0
        print(f"stats {s.name:18} requests ok={i.success.count} failed={i.fail.count} "
              f"inferences={s.inference_count} executions={s.execution_count} "
              f"(mean batch {mean:.2f}) queue_us={i.queue.ns // 1000} "
              f"infer_us={i.compute_infer.ns // 1000}")
    client.close()

    if args.metrics_url:
        with urllib.request.urlopen(args.metrics_url, timeout=10) as response:
            lines = response.read().decode().splitlines()
        wanted = ("nv_inference_count{", "nv_inference_exec_count{",
                  "nv_inference_request_success{", "nv_inference_request_failure{")
        print("metrics:")
        for line in lines:
            if line.startswith(wanted) and 'model="clip_' in line:
                print(f"  {line}")


if __name__ == "__main__":
    main()

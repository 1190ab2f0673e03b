"""The reference point "what users write instead": open_clip in PyTorch behind grpc.aio.

A plain `clipserve.v1.ClipService` server with one RPC, EncodeImage (encoded images only):
each request is decoded with PIL, run through open_clip's own evaluation transform and
`model.encode_image(..., normalize=True)` right inside the async handler, one request at a
time, with no batching across requests. The model is created exactly as
``clipserve export --pretrained none --seed N`` creates it, so its weights are the exported
ones. `clipserve bench` starts it as a subprocess; it prints ``SERVING on port N`` when ready.

    python benchmarks/torch_server.py --model ViT-B-32 [--seed 0] [--model-config FILE.json]

Benchmark code, not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from pathlib import Path

import grpc
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clipserve.export.loader import load_model
from clipserve.export.options import ExportOptions
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

log = logging.getLogger("torch_server")


class TorchClipServicer(pb_grpc.ClipServiceServicer):
    def __init__(self, model: torch.nn.Module, preprocess: object) -> None:
        self.model = model
        self.preprocess = preprocess

    async def EncodeImage(  # noqa: N802 - gRPC method name
        self, request: pb.EncodeImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeImageResponse:
        images = [Image.open(io.BytesIO(image.data)) for image in request.images]
        batch = torch.stack([self.preprocess(im) for im in images])  # [N, 3, S, S]
        with torch.inference_mode():
            embeddings = self.model.encode_image(batch, normalize=True)  # [N, D]
        return pb.EncodeImageResponse(
            embeddings=[pb.Embedding(values=row) for row in embeddings.tolist()],
            dim=embeddings.shape[1],
            format=pb.EMBEDDING_FORMAT_FLOAT,
        )


async def serve(model_name: str, seed: int, host: str, port: int) -> None:
    loaded = load_model(ExportOptions(model=model_name, pretrained="none", seed=seed))
    model = loaded.model.eval()
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    preprocess = image_transform_v2(cfg, is_train=False)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)]
    )
    pb_grpc.add_ClipServiceServicer_to_server(TorchClipServicer(model, preprocess), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    with torch.inference_mode():  # first call outside the measurement
        model.encode_image(torch.zeros(1, 3, cfg.size[0], cfg.size[1]))
    log.info("torch %s, %d threads; SERVING on port %d", torch.__version__,
             torch.get_num_threads(), bound)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-config", type=Path, default=None,
                        help="an open_clip model config (JSON) to register first")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model_config is not None:
        open_clip.add_model_config(args.model_config)
    asyncio.run(serve(args.model, args.seed, args.host, args.port))


if __name__ == "__main__":
    main()

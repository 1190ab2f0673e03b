"""Every RPC of a real server on the tiny exported model, checked against PyTorch open_clip."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from skimage import data as skdata

from clipserve.repository import load_manifest
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import health_status

PHOTOS = {
    "chelsea": skdata.chelsea(),
    "astronaut": skdata.astronaut(),
    "coffee": skdata.coffee(),
    "rocket": skdata.rocket(),
}


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stub(clip_server):
    channel = grpc.insecure_channel(clip_server.address)
    yield pb_grpc.ClipServiceStub(channel)
    channel.close()


def values(response) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def torch_text(model, texts: list[str]) -> np.ndarray:
    import open_clip
    import torch

    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE tokenizer, context 77
    with torch.no_grad():
        return model.encode_text(tokenizer(texts), normalize=True).numpy()


def torch_image(model, images: list[Image.Image], preprocess) -> np.ndarray:
    import torch

    with torch.no_grad():
        batch = torch.stack([preprocess(image) for image in images])
        return model.encode_image(batch, normalize=True).numpy()


def torch_preprocess(repository):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    p = load_manifest(repository).preprocess
    cfg = PreprocessCfg(
        size=p.size, mean=p.mean, std=p.std, interpolation=p.interpolation,
        resize_mode=p.resize_mode, fill_color=p.fill_color,
    )
    assert open_clip is not None
    return image_transform_v2(cfg, is_train=False)


# -- health, reflection, info ---------------------------------------------------------------
def test_health_reports_serving_for_the_server_and_the_service(clip_server) -> None:
    assert health_status(clip_server.address) == "SERVING"
    assert health_status(clip_server.address, "clipserve.v1.ClipService") == "SERVING"


def test_reflection_lists_the_services(clip_server) -> None:
    with grpc.insecure_channel(clip_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"clipserve.v1.ClipService", "grpc.health.v1.Health"} <= names


def test_model_info_describes_the_repository(stub, clip_server) -> None:
    manifest = load_manifest(clip_server.repository)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.model_name == manifest.source.model_name
    assert info.pretrained == manifest.source.pretrained
    assert info.embedding_dim == manifest.embedding_dim
    assert info.image_size == manifest.preprocess.size
    assert info.context_length == 77
    assert info.precision == "fp32"
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.vision_batching.max_batch_size == 8
    # --batch-buckets auto on the CPU: every batch size runs as formed, none is padded
    assert list(info.vision_batching.batch_buckets) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(info.text_batching.length_buckets) == [8, 16, 32, 77]
    assert info.vision_batching.instances == info.text_batching.instances == 1
    assert info.logit_scale == pytest.approx(manifest.logit_scale)
    assert list(info.default_templates) == list(manifest.default_templates)


# -- encode ---------------------------------------------------------------------------------
def test_encode_text_matches_pytorch_open_clip(stub, tiny_torch_model) -> None:
    texts = ["a photo of a cat.", "a diagram", "", "Ünïcödé — “quotes” & emoji 🐱", "word " * 100]
    response = stub.EncodeText(pb.EncodeTextRequest(texts=texts), timeout=30)
    served = values(response)
    assert served.shape == (len(texts), response.dim)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    expected = torch_text(tiny_torch_model, texts)
    cosine = (served * expected).sum(1)
    assert cosine.min() >= 0.99999, cosine
    assert list(response.token_counts)[:3] == [8, 4, 2]
    assert response.token_counts[-1] == 77  # truncated to the context


def test_encode_image_matches_pytorch_open_clip(stub, clip_server, tiny_torch_model) -> None:
    images = [Image.fromarray(a) for a in PHOTOS.values()]
    request = pb.EncodeImageRequest(images=[pb.Image(data=encode(np.asarray(i))) for i in images])
    served = values(stub.EncodeImage(request, timeout=60))
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    expected = torch_image(tiny_torch_model, images, torch_preprocess(clip_server.repository))
    cosine = (served * expected).sum(1)
    assert cosine.min() >= 0.9999, cosine


def test_preprocessed_tensors_give_the_same_embeddings_as_encoded_images(stub, clip_server) -> None:
    preprocess = torch_preprocess(clip_server.repository)
    png = encode(PHOTOS["coffee"])
    tensor = preprocess(Image.open(io.BytesIO(png))).numpy().astype("<f4")
    request = pb.EncodeImageRequest(
        images=[
            pb.Image(data=png),
            pb.Image(tensor=pb.Tensor(shape=tensor.shape, dtype=pb.DATA_TYPE_FLOAT32,
                                      data=tensor.tobytes())),
            pb.Image(tensor=pb.Tensor(shape=tensor.shape, dtype=pb.DATA_TYPE_FLOAT16,
                                      data=tensor.astype("<f2").tobytes())),
        ]
    )
    served = values(stub.EncodeImage(request, timeout=30))
    assert float(served[0] @ served[1]) >= 0.9999
    assert float(served[1] @ served[2]) >= 0.999  # fp16 transport


def test_raw_byte_formats_carry_the_same_embeddings(stub) -> None:
    texts = ["a dog", "a red circle"]
    floats = values(stub.EncodeText(pb.EncodeTextRequest(texts=texts), timeout=30))
    fp32 = stub.EncodeText(
        pb.EncodeTextRequest(texts=texts, format=pb.EMBEDDING_FORMAT_FP32_BYTES), timeout=30
    )
    fp16 = stub.EncodeText(
        pb.EncodeTextRequest(texts=texts, format=pb.EMBEDDING_FORMAT_FP16_BYTES), timeout=30
    )
    assert fp32.format == pb.EMBEDDING_FORMAT_FP32_BYTES
    as32 = np.stack([np.frombuffer(e.raw, "<f4") for e in fp32.embeddings])
    as16 = np.stack([np.frombuffer(e.raw, "<f2") for e in fp16.embeddings]).astype(np.float32)
    np.testing.assert_array_equal(as32, floats)
    np.testing.assert_allclose(as16, floats, atol=1e-3)
    assert all(len(e.values) == 0 for e in fp32.embeddings)


# -- classify and rank ----------------------------------------------------------------------
def test_classify_equals_softmax_of_scaled_cosines(stub, clip_server) -> None:
    manifest = load_manifest(clip_server.repository)
    labels = ["cat", "astronaut", "cup of coffee", "rocket"]
    templates = ["a photo of a {}.", "a picture of the {}"]
    images = [pb.Image(data=encode(PHOTOS[n])) for n in ("chelsea", "rocket")]
    response = stub.Classify(
        pb.ClassifyRequest(images=images, labels=labels, templates=templates), timeout=60
    )
    # the same computation from the served embeddings
    image_emb = values(stub.EncodeImage(pb.EncodeImageRequest(images=images), timeout=30))
    texts = [t.replace("{}", label) for label in labels for t in templates]
    text_emb = values(stub.EncodeText(pb.EncodeTextRequest(texts=texts), timeout=30))
    label_emb = text_emb.reshape(len(labels), len(templates), -1).mean(1)
    label_emb /= np.linalg.norm(label_emb, axis=1, keepdims=True)
    cosine = image_emb @ label_emb.T
    logits = manifest.logit_scale * cosine.astype(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert len(response.classifications) == 2
    for i, result in enumerate(response.classifications):
        got = {s.index: (s.probability, s.score, s.label) for s in result.labels}
        assert len(got) == len(labels)
        for j, label in enumerate(labels):
            assert got[j][2] == label
            assert got[j][0] == pytest.approx(expected[i, j], abs=1e-5)
            assert got[j][1] == pytest.approx(cosine[i, j], abs=1e-5)
        scores = [s.score for s in result.labels]
        assert scores == sorted(scores, reverse=True)
        assert sum(s.probability for s in result.labels) == pytest.approx(1.0, abs=1e-5)


def test_classify_without_templates_uses_the_manifests_and_top_k_is_the_head(
    stub, clip_server
) -> None:
    manifest = load_manifest(clip_server.repository)
    templates = list(manifest.default_templates)
    assert len(templates) > 1  # open_clip's ImageNet set
    labels = [f"label {i}" for i in range(6)]
    image = pb.Image(data=encode(PHOTOS["astronaut"]))
    (result,) = stub.Classify(
        pb.ClassifyRequest(images=[image], labels=labels, top_k=2), timeout=60
    ).classifications
    # the same computation from the served embeddings, over the manifest's templates
    image_emb = values(stub.EncodeImage(pb.EncodeImageRequest(images=[image]), timeout=30))[0]
    label_emb = np.stack([  # one request per label: within max_items_per_request
        values(stub.EncodeText(pb.EncodeTextRequest(
            texts=[t.replace("{}", label) for t in templates]), timeout=60)).mean(0)
        for label in labels
    ])
    label_emb /= np.linalg.norm(label_emb, axis=1, keepdims=True)
    cosine = label_emb @ image_emb
    logits = manifest.logit_scale * cosine.astype(np.float64) + (manifest.logit_bias or 0.0)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    top = list(np.argsort(-cosine, kind="stable")[:2])
    assert [s.index for s in result.labels] == top
    for s in result.labels:
        assert s.label == labels[s.index]
        assert s.score == pytest.approx(float(cosine[s.index]), abs=1e-5)
        assert s.probability == pytest.approx(float(expected[s.index]), abs=1e-5)


def test_repeated_labels_come_from_the_cache(stub, clip_server) -> None:
    cache = clip_server.server.model.label_cache
    labels = ["zebra", "giraffe", "okapi"]
    request = pb.ClassifyRequest(
        images=[pb.Image(data=encode(PHOTOS["chelsea"]))], labels=labels, templates=["{}"]
    )
    first = stub.Classify(request, timeout=30)
    hits = cache.hits
    text_items = clip_server.server.model.text.stats.inference_count
    second = stub.Classify(request, timeout=30)
    assert cache.hits == hits + 3
    assert clip_server.server.model.text.stats.inference_count == text_items  # no text compute
    assert first == second


def test_rank_orders_image_candidates_for_a_text_query(stub) -> None:
    names = list(PHOTOS)
    candidates = [pb.RankItem(image=pb.Image(data=encode(PHOTOS[n]))) for n in names]
    response = stub.Rank(pb.RankRequest(query=pb.RankItem(text="a cat"), candidates=candidates),
                         timeout=60)
    query = values(stub.EncodeText(pb.EncodeTextRequest(texts=["a cat"]), timeout=30))[0]
    images = values(stub.EncodeImage(
        pb.EncodeImageRequest(images=[c.image for c in candidates]), timeout=30))
    scores = images @ query
    assert [c.index for c in response.candidates] == list(np.argsort(-scores, kind="stable"))
    for c in response.candidates:
        assert c.score == pytest.approx(scores[c.index], abs=1e-5)
    assert sum(c.probability for c in response.candidates) == pytest.approx(1.0, abs=1e-5)


def test_rank_mixes_texts_and_images_and_honours_top_k(stub) -> None:
    chelsea, rocket = (pb.Image(data=encode(PHOTOS[n])) for n in ("chelsea", "rocket"))
    candidates = [
        pb.RankItem(text="a cat"),
        pb.RankItem(image=chelsea),
        pb.RankItem(text="a rocket launch"),
    ]
    response = stub.Rank(
        pb.RankRequest(query=pb.RankItem(image=rocket), candidates=candidates, top_k=2),
        timeout=60,
    )
    # each candidate embedded by its own kind's method, in the request's order
    texts = values(stub.EncodeText(pb.EncodeTextRequest(texts=["a cat", "a rocket launch"]),
                                   timeout=30))
    images = values(stub.EncodeImage(pb.EncodeImageRequest(images=[chelsea, rocket]),
                                     timeout=30))
    scores = np.stack([texts[0], images[0], texts[1]]) @ images[1]
    assert [c.index for c in response.candidates] == list(np.argsort(-scores, kind="stable")[:2])
    for c in response.candidates:
        assert c.score == pytest.approx(float(scores[c.index]), abs=1e-5)


# -- errors ---------------------------------------------------------------------------------
def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


# Every malformed request, with its exact status and message: tests/integration/test_bad_input.py


def test_an_undecodable_image_is_named_and_other_items_are_not_affected(stub) -> None:
    good = pb.Image(data=encode(PHOTOS["chelsea"]))
    bad = pb.Image(data=b"\x89PNG\r\n\x1a\n not really a png")
    error = rpc_error(stub.EncodeImage, pb.EncodeImageRequest(images=[good, good, bad]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("images[2]: ")
    # a bad item in one request never fails other requests batched with it
    futures = [
        stub.EncodeImage.future(pb.EncodeImageRequest(images=[good]), timeout=30)
        for _ in range(4)
    ]
    bad_future = stub.EncodeImage.future(pb.EncodeImageRequest(images=[bad]), timeout=30)
    assert all(len(f.result().embeddings) == 1 for f in futures)
    assert bad_future.exception().code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_deadline_too_short_for_the_work_gets_deadline_exceeded(stub) -> None:
    images = [pb.Image(data=encode(PHOTOS["astronaut"]))] * 64
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeImage(pb.EncodeImageRequest(images=images), timeout=0.001)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_unknown_errors_never_leak_internals(
    stub, clip_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception inside a method reaches the caller as INTERNAL with a fixed
    message; what it said (a path here) goes to the server's log only."""
    from clipserve.server.grpc_errors import INTERNAL_MESSAGE

    secret = "/secret/path/model.onnx"

    async def broken(*args: object, **kwargs: object) -> None:
        raise KeyError(secret)

    monkeypatch.setattr(clip_server.server.model, "encode_texts", broken)
    with caplog.at_level("ERROR", logger="clipserve"):
        error = rpc_error(stub.EncodeText, pb.EncodeTextRequest(texts=["a cat"]))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE
    assert secret not in json.dumps([error.details(), list(error.trailing_metadata() or ())])
    logged = [r for r in caplog.records if "EncodeText failed with an unexpected error" in
              r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert secret in str(logged[0].exc_info[1])
    monkeypatch.undo()
    assert len(stub.EncodeText(pb.EncodeTextRequest(texts=["a cat"]), timeout=30).embeddings) == 1

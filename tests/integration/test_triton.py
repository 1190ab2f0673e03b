"""The KServe v2 / Triton protocol on a real server, called with tritonclient 2.73.

Same port, same batchers as clipserve.v1.ClipService: every model's embeddings must equal
ClipService's for the same input. Typed `contents` requests (which tritonclient never sends) go
through tritonclient's own generated stub.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from clipserve.repository import load_manifest
from clipserve.server.preprocess import ImagePreprocessor
from clipserve.server.tokenizer import ClipTokenizer
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as tpb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as tpb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TEXTS = ["a photo of a cat", "a diagram", "Ünïcode façade ☕", "x " * 100]
ATOL = 1e-5


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png(skdata.chelsea()), png(skdata.coffee()[::4, ::4]), png(skdata.camera())]


@pytest.fixture(scope="module")
def client(clip_server):
    triton = tc.InferenceServerClient(clip_server.address)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def channel(clip_server):
    with grpc.insecure_channel(clip_server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def typed(channel):
    """tritonclient's generated stub, for requests with typed contents."""
    return tpb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(channel, clip_server):
    """ClipService answers for IMAGES and TEXTS, and the server's own preprocessing."""
    stub = pb_grpc.ClipServiceStub(channel)
    images = stub.EncodeImage(pb.EncodeImageRequest(images=[pb.Image(data=d) for d in IMAGES]))
    texts = stub.EncodeText(pb.EncodeTextRequest(texts=TEXTS))
    manifest = load_manifest(clip_server.repository)
    return {
        "images": np.array([list(e.values) for e in images.embeddings], np.float32),
        "texts": np.array([list(e.values) for e in texts.embeddings], np.float32),
        "pixels": np.stack([ImagePreprocessor(manifest.preprocess).decode(d) for d in IMAGES]),
        "ids": ClipTokenizer.from_repository(clip_server.repository, manifest.tokenizer)
        .encode_batch(TEXTS),
        "manifest": manifest,
        "stub": stub,
    }


def infer(client, model: str, name: str, array: np.ndarray, datatype: str, **kwargs):
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor], **kwargs)


def padded(ids: list[np.ndarray], length: int = 77) -> np.ndarray:
    out = np.zeros((len(ids), length), np.int64)  # what open_clip's tokenizer returns
    for row, value in enumerate(ids):
        out[row, : len(value)] = value
    return out


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status(), raised.value.message()


# -- health, metadata, configuration ---------------------------------------------------------
def test_server_is_live_ready_and_names_its_extensions(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "clipserve"
    assert {"model_configuration", "statistics"} <= set(metadata.extensions)


def test_the_repository_index_lists_every_model_ready(client) -> None:
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (name, "1", "READY")
        for name in ("clip_vision", "clip_text", "clip_image_bytes", "clip_text_strings")
    ]


def test_model_ready_is_false_for_unknown_models_and_versions(client) -> None:
    assert client.is_model_ready("clip_vision")
    assert client.is_model_ready("clip_text", "1")
    assert not client.is_model_ready("resnet50")
    assert not client.is_model_ready("clip_text", "2")


@pytest.mark.parametrize(
    ("model", "inputs", "outputs"),
    [
        ("clip_vision", ("pixel_values", "FP32", [-1, 3, 224, 224]), "image_embeds"),
        ("clip_text", ("input_ids", "INT64", [-1, -1]), "text_embeds"),
        ("clip_image_bytes", ("images", "BYTES", [-1, 1]), "image_embeds"),
        ("clip_text_strings", ("texts", "BYTES", [-1, 1]), "text_embeds"),
    ],
)
def test_model_metadata(client, reference, model: str, inputs: tuple, outputs: str) -> None:
    metadata = client.get_model_metadata(model)
    assert (metadata.name, list(metadata.versions)) == (model, ["1"])
    tensor = metadata.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == inputs
    dim = reference["manifest"].embedding_dim
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        (outputs, "FP32", [-1, dim])
    ]


def test_model_config_is_a_triton_model_config(client, clip_server) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    s = clip_server.settings
    vision = client.get_model_config("clip_vision").config
    assert (vision.name, vision.platform, vision.backend) == (
        "clip_vision", "onnxruntime_onnx", "onnxruntime"
    )
    assert vision.max_batch_size == s.max_items_per_request
    assert vision.input[0].data_type == mc.TYPE_FP32
    assert vision.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert list(vision.input[0].dims) == [3, 224, 224]
    assert list(vision.dynamic_batching.preferred_batch_size) == [s.vision_max_batch_size]
    assert vision.dynamic_batching.max_queue_delay_microseconds == s.max_queue_delay_us
    assert vision.dynamic_batching.default_queue_policy.max_queue_size == s.max_queue_size
    assert vision.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert vision.instance_group[0].count == s.vision_instances == 1
    strings = client.get_model_config("clip_text_strings").config
    assert strings.input[0].data_type == mc.TYPE_STRING
    assert list(strings.dynamic_batching.preferred_batch_size) == [s.text_max_batch_size]
    assert strings.parameters["composing_model"].string_value == "clip_text"
    as_json = client.get_model_config("clip_text", as_json=True)
    assert as_json["config"]["input"][0]["dims"] == ["-1"]


# -- inference, checked against ClipService ----------------------------------------------------
def test_clip_image_bytes_equals_clipservice(client, reference) -> None:
    images = np.array([[d] for d in IMAGES], dtype=object)
    result = infer(client, "clip_image_bytes", "images", images, "BYTES", request_id="r1")
    np.testing.assert_allclose(result.as_numpy("image_embeds"), reference["images"], atol=ATOL)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == (
        "r1", "clip_image_bytes", "1"
    )


def test_clip_vision_fp32_raw_equals_clipservice(client, reference) -> None:
    result = infer(client, "clip_vision", "pixel_values", reference["pixels"], "FP32")
    np.testing.assert_allclose(result.as_numpy("image_embeds"), reference["images"], atol=ATOL)


def test_clip_vision_fp16_raw_equals_clipservice_with_the_same_fp16_tensor(
    client, reference
) -> None:
    half = reference["pixels"].astype(np.float16)
    result = infer(client, "clip_vision", "pixel_values", half, "FP16")
    tensors = [
        pb.Image(tensor=pb.Tensor(shape=list(p.shape), dtype=pb.DATA_TYPE_FLOAT16,
                                  data=p.tobytes()))
        for p in half
    ]
    expected = reference["stub"].EncodeImage(pb.EncodeImageRequest(images=tensors))
    expected = np.array([list(e.values) for e in expected.embeddings], np.float32)
    np.testing.assert_allclose(result.as_numpy("image_embeds"), expected, atol=ATOL)
    np.testing.assert_allclose(result.as_numpy("image_embeds"), reference["images"], atol=2e-2)


def test_clip_vision_typed_contents_answer_typed_contents(typed, reference) -> None:
    pixels = reference["pixels"][:2]
    request = tpb.ModelInferRequest(model_name="clip_vision")
    tensor = request.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    response = typed.ModelInfer(request, timeout=60)
    assert not response.raw_output_contents
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == (
        "image_embeds", "FP32", [2, reference["manifest"].embedding_dim]
    )
    embeddings = np.array(output.contents.fp32_contents, np.float32).reshape(output.shape)
    np.testing.assert_allclose(embeddings, reference["images"][:2], atol=ATOL)


def test_clip_text_int64_padded_ids_equal_clipservice(client, reference) -> None:
    result = infer(client, "clip_text", "input_ids", padded(reference["ids"]), "INT64")
    np.testing.assert_allclose(result.as_numpy("text_embeds"), reference["texts"], atol=ATOL)


def test_clip_text_int32_typed_unpadded_ids_equal_clipservice(typed, reference) -> None:
    ids = reference["ids"][:2]
    length = max(len(i) for i in ids)
    request = tpb.ModelInferRequest(model_name="clip_text")
    tensor = request.inputs.add(name="input_ids", datatype="INT32", shape=[2, length])
    tensor.contents.int_contents.extend(padded(ids, length).astype(np.int32).ravel().tolist())
    response = typed.ModelInfer(request, timeout=60)
    embeddings = np.array(response.outputs[0].contents.fp32_contents, np.float32).reshape(2, -1)
    np.testing.assert_allclose(embeddings, reference["texts"][:2], atol=ATOL)


def test_clip_text_strings_raw_and_typed_equal_clipservice(client, typed, reference) -> None:
    texts = np.array([[t.encode()] for t in TEXTS], dtype=object)
    result = infer(client, "clip_text_strings", "texts", texts, "BYTES")
    np.testing.assert_allclose(result.as_numpy("text_embeds"), reference["texts"], atol=ATOL)
    request = tpb.ModelInferRequest(model_name="clip_text_strings")
    tensor = request.inputs.add(name="texts", datatype="BYTES", shape=[len(TEXTS), 1])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    response = typed.ModelInfer(request, timeout=60)
    embeddings = np.array(response.outputs[0].contents.fp32_contents, np.float32)
    np.testing.assert_allclose(embeddings.reshape(len(TEXTS), -1), reference["texts"], atol=ATOL)


def test_requested_outputs_and_the_truncate_parameter(client) -> None:
    texts = np.array([[b"word " * 100]], dtype=object)
    tensor = tc.InferInput("texts", [1, 1], "BYTES")
    tensor.set_data_from_numpy(texts)
    wanted = [tc.InferRequestedOutput("text_embeds")]
    result = client.infer("clip_text_strings", [tensor], outputs=wanted)
    assert result.as_numpy("text_embeds").shape[0] == 1
    code, message = status_of(
        lambda: client.infer("clip_text_strings", [tensor], parameters={"truncate": False})
    )
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "texts[0]" in message
    assert "tokens long" in message
    code, message = status_of(
        lambda: client.infer("clip_text_strings", [tensor], parameters={"truncate": "no"})
    )
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert message.endswith("parameter 'truncate' must be a bool")


# -- errors -----------------------------------------------------------------------------------
def test_a_wrong_shape_is_invalid_argument_naming_the_tensor(client) -> None:
    pixels = np.zeros((1, 3, 224, 223), np.float32)
    code, message = status_of(lambda: infer(client, "clip_vision", "pixel_values", pixels, "FP32"))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'pixel_values' has shape [1, 3, 224, 223]" in message


def test_a_wrong_datatype_is_invalid_argument_naming_the_tensor(client) -> None:
    pixels = np.zeros((1, 3, 224, 224), np.float64)
    code, message = status_of(lambda: infer(client, "clip_vision", "pixel_values", pixels, "FP64"))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'pixel_values' has datatype FP64" in message
    ids = np.zeros((1, 5), np.float32)
    code, message = status_of(lambda: infer(client, "clip_text", "input_ids", ids, "FP32"))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'input_ids' has datatype FP32; clip_text accepts INT64 or INT32" in message


def test_unknown_models_and_versions_are_not_found(client) -> None:
    pixels = np.zeros((1, 3, 224, 224), np.float32)
    code, message = status_of(lambda: infer(client, "resnet50", "pixel_values", pixels, "FP32"))
    assert code == "StatusCode.NOT_FOUND"
    assert "unknown model 'resnet50'" in message
    for call in (
        lambda: client.get_model_metadata("resnet50"),
        lambda: client.get_model_config("resnet50"),
        lambda: client.get_inference_statistics("resnet50"),
        lambda: infer(client, "clip_vision", "pixel_values", pixels, "FP32", model_version="3"),
    ):
        assert status_of(call)[0] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("model", "name", "array", "datatype", "expected"),
    [
        ("clip_image_bytes", "images", np.array([[IMAGES[0]], [b"not an image"]], dtype=object),
         "BYTES", "images[1]:"),
        ("clip_text_strings", "texts", np.array([[b"\xff\xfe"]], dtype=object), "BYTES",
         "texts[0]: text is not valid UTF-8"),
        ("clip_text", "input_ids", np.array([[49406, 60000, 49407]]), "INT64",
         "input_ids[0]: token id 60000 is outside the vocabulary"),
        ("clip_text", "input_ids", np.zeros((1, 78), np.int64), "INT64", "1 to 77"),
        ("clip_vision", "pixel_values", np.full((1, 3, 224, 224), np.nan, np.float32), "FP32",
         "pixel_values[0]: tensor contains NaN"),
        ("clip_vision", "pixel_values", np.zeros((0, 3, 224, 224), np.float32), "FP32",
         "pixel_values is empty"),
    ],
)
def test_bad_elements_are_invalid_argument_naming_the_element(
    client, model: str, name: str, array: np.ndarray, datatype: str, expected: str
) -> None:
    code, message = status_of(lambda: infer(client, model, name, array, datatype))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert expected in message


def test_rpcs_clipserve_does_not_serve_are_unimplemented(client) -> None:
    code, _ = status_of(client.get_system_shared_memory_status)
    assert code == "StatusCode.UNIMPLEMENTED"


# -- statistics --------------------------------------------------------------------------------
def _counts(client, model: str) -> tuple[int, int, int, int]:
    s = client.get_inference_statistics(model).model_stats[0]
    i = s.inference_stats
    return s.inference_count, s.execution_count, i.success.count, i.fail.count


def test_statistics_count_requests_items_and_the_towers_shared_work(client, reference) -> None:
    strings, text = _counts(client, "clip_text_strings"), _counts(client, "clip_text")
    texts = np.array([[t.encode()] for t in TEXTS[:3]], dtype=object)
    infer(client, "clip_text_strings", "texts", texts, "BYTES")
    invalid = np.array([[b"\xff"]], dtype=object)
    status_of(lambda: infer(client, "clip_text_strings", "texts", invalid, "BYTES"))
    after = _counts(client, "clip_text_strings")
    assert after[0] - strings[0] == 3  # items
    assert after[1] - strings[1] >= 1  # executions that held them
    assert (after[2] - strings[2], after[3] - strings[3]) == (1, 1)  # success, fail
    # the tower computed them: it counts them, but they were not requests to clip_text
    tower = _counts(client, "clip_text")
    assert tower[0] - text[0] == 3
    assert tower[2:] == text[2:]
    # clipserve.v1 traffic runs on the same tower batcher
    reference["stub"].EncodeText(pb.EncodeTextRequest(texts=["one more"]))
    assert _counts(client, "clip_text")[0] == tower[0] + 1

    stats = client.get_inference_statistics("clip_text_strings").model_stats[0]
    i = stats.inference_stats
    assert i.success.ns >= i.queue.ns
    assert i.success.ns >= i.compute_infer.ns > 0
    assert i.compute_input.count == i.compute_output.count == i.success.count
    assert stats.last_inference > 0
    tower_stats = client.get_inference_statistics("clip_text").model_stats[0]
    computed = sum(b.batch_size * b.compute_infer.count for b in tower_stats.batch_stats)
    assert computed == tower_stats.inference_count
    everything = client.get_inference_statistics()
    assert len(everything.model_stats) == 4

"""`clipserve export` end to end on the tiny model: layout, manifest, Triton configs, parity.

Real components throughout: open_clip, torch.onnx, ONNX Runtime. Two full exports run here
(`tiny_repository` from conftest, and the fp16 variant); the failure-path tests reuse the tiny
repository's ONNX files instead of exporting the same weights again (`reuse_towers`), so the
code under test (loading, parity gate, writing, publishing) still runs for real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from clipserve.repository import (
    MANIFEST_NAME,
    TEXT_INPUT,
    TEXT_MODEL,
    TEXT_OUTPUT,
    TOKENIZER_NAME,
    VISION_INPUT,
    VISION_MODEL,
    VISION_OUTPUT,
    load_manifest,
    sha256_file,
    sha256_onnx,
)
from tests.conftest import TINY_EMBEDDING_DIM, TINY_IMAGE_SIZE, TINY_MODEL, TINY_SEED

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from clipserve.export import onnx_export  # noqa: E402
from clipserve.export.options import (  # noqa: E402
    ExportError,
    ExportOptions,
    OutputExistsError,
    ParityError,
)
from clipserve.export.writer import default_templates, export_repository  # noqa: E402

BATCH_SIZES = (1, 3, 17)
LENGTHS = (2, 16, 77)


def _options(output: Path, **overrides) -> ExportOptions:
    fields = {"model": TINY_MODEL, "pretrained": "none", "seed": TINY_SEED, "output": output}
    fields.update(overrides)
    return ExportOptions(**fields)


def _leftovers(parent: Path) -> list[str]:
    """Staging or retired folders an export may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- layout, manifest, configs ----------------------------------------------------------
def test_repository_layout(tiny_repository: Path) -> None:
    files = sorted(str(p.relative_to(tiny_repository)) for p in tiny_repository.rglob("*"))
    assert files == sorted(
        [
            MANIFEST_NAME,
            TOKENIZER_NAME,
            TEXT_MODEL,
            f"{TEXT_MODEL}/1",
            f"{TEXT_MODEL}/1/model.onnx",
            f"{TEXT_MODEL}/1/model.onnx.data",
            f"{TEXT_MODEL}/config.pbtxt",
            VISION_MODEL,
            f"{VISION_MODEL}/1",
            f"{VISION_MODEL}/1/model.onnx",
            f"{VISION_MODEL}/1/model.onnx.data",
            f"{VISION_MODEL}/config.pbtxt",
        ]
    )
    assert _leftovers(tiny_repository.parent) == []


def test_weights_live_in_the_external_data_file(tiny_repository: Path) -> None:
    """The graph file holds no weights: they are in model.onnx.data (memory-mapped on load),
    and the manifest's checksum covers both files."""
    for tower in (VISION_MODEL, TEXT_MODEL):
        graph, data = (tiny_repository / tower / "1" / n for n in ("model.onnx", "model.onnx.data"))
        assert data.stat().st_size > graph.stat().st_size
        proto = onnx.load(str(graph), load_external_data=False)
        external = [t for t in proto.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        assert sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL) < 1 << 20
        assert external
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
            "model.onnx.data"
        }
    manifest = load_manifest(tiny_repository)
    vision = tiny_repository / manifest.vision.file
    assert manifest.vision.sha256 == sha256_onnx(vision) != sha256_file(vision)


def test_manifest_contents(tiny_repository: Path) -> None:
    manifest = load_manifest(tiny_repository)
    assert manifest.source.model_name == TINY_MODEL
    assert manifest.source.pretrained == "none"
    assert manifest.source.checkpoint_sha256 == ""
    assert manifest.source.open_clip_version == open_clip.__version__
    assert manifest.source.torch_version == torch.__version__
    assert manifest.source.opset == 18
    assert manifest.embedding_dim == TINY_EMBEDDING_DIM
    assert manifest.precision == "fp32"
    for tower in (manifest.vision, manifest.text):
        graph = tiny_repository / tower.file  # the graph, then its external weights
        digest = hashlib.sha256(
            graph.read_bytes() + graph.with_name(graph.name + ".data").read_bytes()
        ).hexdigest()
        assert tower.sha256 == digest
    assert (manifest.vision.input, manifest.vision.output) == (VISION_INPUT, VISION_OUTPUT)
    assert (manifest.text.input, manifest.text.output) == (TEXT_INPUT, TEXT_OUTPUT)
    assert manifest.preprocess.size == TINY_IMAGE_SIZE
    assert manifest.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert manifest.preprocess.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert manifest.preprocess.interpolation == "bicubic"
    assert manifest.preprocess.resize_mode == "shortest"
    assert manifest.tokenizer.context_length == 77
    assert (manifest.tokenizer.sot_token_id, manifest.tokenizer.eot_token_id) == (49406, 49407)
    assert manifest.tokenizer.pad_token_id == 0
    assert manifest.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)  # exp(init log(1/0.07))
    assert manifest.logit_bias is None
    assert len(manifest.default_templates) == 80
    assert manifest.default_templates[0] == "a bad photo of a {}."
    assert manifest.default_templates == default_templates()


def test_manifest_parity_report(tiny_repository: Path) -> None:
    parity = load_manifest(tiny_repository).parity
    assert parity["tokenizer"] == {"texts": 17, "mismatches": 0}
    report = parity["fp32"]
    assert report["threshold"] == 0.99999
    assert report["vision"]["min_cosine"] >= 0.99999
    assert report["vision"]["items"] == sum(BATCH_SIZES)
    assert report["text"]["min_cosine"] >= 0.99999
    assert report["text"]["items"] == sum(BATCH_SIZES) * len(LENGTHS)
    assert report["text"]["lengths"] == list(LENGTHS)
    assert report["vision"]["max_abs_diff"] < 1e-4
    assert "fp16" not in parity


@pytest.mark.parametrize(
    ("model", "dims", "input_type"),
    [
        (VISION_MODEL, [3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], model_config_pb2.TYPE_FP32),
        (TEXT_MODEL, [-1], model_config_pb2.TYPE_INT64),
    ],
)
def test_config_pbtxt_parses_as_triton_model_config(
    tiny_repository: Path, model: str, dims: list[int], input_type: int
) -> None:
    text = (tiny_repository / model / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    (tensor_in,) = config.input
    (tensor_out,) = config.output
    assert list(tensor_in.dims) == dims
    assert tensor_in.data_type == input_type
    assert list(tensor_out.dims) == [TINY_EMBEDDING_DIM]
    assert tensor_out.data_type == model_config_pb2.TYPE_FP32
    manifest = load_manifest(tiny_repository)
    tower = manifest.vision if model == VISION_MODEL else manifest.text
    assert (tensor_in.name, tensor_out.name) == (tower.input, tower.output)


def test_onnx_graphs_have_dynamic_axes_and_pinned_opset(tiny_repository: Path) -> None:
    for model, axes in ((VISION_MODEL, {0}), (TEXT_MODEL, {0, 1})):
        graph = onnx.load(str(tiny_repository / model / "1/model.onnx"))
        opsets = {o.domain: o.version for o in graph.opset_import}
        assert opsets[""] == 18
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert {i for i, d in enumerate(dims) if d.dim_param} == axes


# -- ONNX Runtime against PyTorch ------------------------------------------------------
def _photos(count: int) -> list:
    from PIL import Image
    from skimage import data as skdata

    arrays = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    return [Image.fromarray(arrays[i % len(arrays)]).rotate(7 * i) for i in range(count)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_vision_matches_pytorch(tiny_repository: Path, tiny_torch_model, batch: int) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    p = load_manifest(tiny_repository).preprocess
    transform = image_transform_v2(
        PreprocessCfg(size=p.size, mean=p.mean, std=p.std, interpolation=p.interpolation,
                      resize_mode=p.resize_mode),
        is_train=False,
    )
    pixels = torch.stack([transform(img) for img in _photos(batch)])  # [B, 3, S, S]
    with torch.no_grad():
        expected = tiny_torch_model.encode_image(pixels, normalize=True).numpy()
    session = ort.InferenceSession(str(tiny_repository / VISION_MODEL / "1/model.onnx"))
    (actual,) = session.run(None, {VISION_INPUT: pixels.numpy()})
    assert actual.shape == (batch, TINY_EMBEDDING_DIM)
    assert _cosines(actual, expected).min() >= 0.99999
    assert np.linalg.norm(actual, axis=-1) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_text_matches_pytorch_at_any_length(
    tiny_repository: Path, tiny_torch_model, batch: int, length: int
) -> None:
    """Ids at length L through ONNX == the same ids padded to 77 through open_clip."""
    from clipserve.export.parity import truncate_ids
    from clipserve.export.samples import sample_texts

    texts = [f"a photo of a number {i}" for i in range(batch)]
    texts[0] = sample_texts(5)[4]  # longer than 77 tokens: truncated
    ids77 = open_clip.get_tokenizer(TINY_MODEL)(texts).numpy()  # [B, 77]
    ids = truncate_ids(ids77, length, 49407)  # [B, L]
    padded = np.zeros_like(ids77)
    padded[:, :length] = ids
    with torch.no_grad():
        expected = tiny_torch_model.encode_text(torch.from_numpy(padded), normalize=True).numpy()
    session = ort.InferenceSession(str(tiny_repository / TEXT_MODEL / "1/model.onnx"))
    (actual,) = session.run(None, {TEXT_INPUT: ids})
    assert actual.shape == (batch, TINY_EMBEDDING_DIM)
    assert _cosines(actual, expected).min() >= 0.99999


def test_runtime_tokenizer_feeds_the_text_tower(tiny_repository: Path, tiny_torch_model) -> None:
    """Server path: tokenizer.json -> pad to the longest -> ONNX == open_clip end to end."""
    from clipserve.server.tokenizer import ClipTokenizer, pad_batch

    manifest = load_manifest(tiny_repository)
    tokenizer = ClipTokenizer.from_repository(tiny_repository, manifest.tokenizer)
    texts = ["a diagram", "“Café” & crème brûlée!", "a photo of a cat " * 30]
    ids = tokenizer.encode_batch(texts)
    batch = pad_batch(ids, max(len(x) for x in ids))
    session = ort.InferenceSession(str(tiny_repository / manifest.text.file))
    (actual,) = session.run(None, {TEXT_INPUT: batch})
    with torch.no_grad():
        ref_ids = open_clip.get_tokenizer(TINY_MODEL)(texts)
        expected = tiny_torch_model.encode_text(ref_ids, normalize=True).numpy()
    assert _cosines(actual, expected).min() >= 0.99999


# -- fp16 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_repository(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fp16") / "repo"
    return export_repository(_options(output, precision="fp16"))


def test_fp16_variant_passes_its_gate_with_fp32_io(fp16_repository: Path, tiny_torch_model) -> None:
    manifest = load_manifest(fp16_repository)
    assert manifest.precision == "fp16"
    assert manifest.parity["fp16"]["threshold"] == 0.999
    for tower in ("vision", "text"):
        assert manifest.parity["fp16"][tower]["min_cosine"] >= 0.999
        assert manifest.parity["fp32"][tower]["min_cosine"] >= 0.99999
    assert not (fp16_repository / ".fp32").exists()
    for tower in (manifest.vision, manifest.text):
        graph = onnx.load(str(fp16_repository / tower.file))
        onnx.checker.check_model(graph)
        elem = onnx.TensorProto
        assert graph.graph.input[0].type.tensor_type.elem_type in (elem.FLOAT, elem.INT64)
        assert graph.graph.output[0].type.tensor_type.elem_type == elem.FLOAT
        assert any(init.data_type == elem.FLOAT16 for init in graph.graph.initializer)
    session = ort.InferenceSession(str(fp16_repository / manifest.text.file))
    ids = open_clip.get_tokenizer(TINY_MODEL)(["a photo of a dog"]).numpy()[:, :8]
    (out,) = session.run(None, {TEXT_INPUT: ids})
    assert out.dtype == np.float32


def test_fp16_keeps_layernorm_softmax_and_normalisation_in_fp32(fp16_repository: Path) -> None:
    from clipserve.export.fp16 import FP32_OP_TYPES

    manifest = load_manifest(fp16_repository)
    for tower in (manifest.vision, manifest.text):
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_repository / tower.file)))
        types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
        types.update({i.name: i.data_type for i in graph.graph.initializer})
        layer_norms = 0
        for node in graph.graph.node:
            if node.op_type in FP32_OP_TYPES:
                assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
                layer_norms += node.op_type == "LayerNormalization"
        assert layer_norms >= 3
        # from the output back to the projection: float32 all the way, no fp16 rounding
        producers = {out: node for node in graph.graph.node for out in node.output}
        node = producers[tower.output]
        seen = []
        while node.op_type != "MatMul":
            seen.append(node.op_type)
            to = [a.i for a in node.attribute if a.name == "to"]
            assert to != [onnx.TensorProto.FLOAT16], seen
            node = producers[node.input[0]]
        assert "Div" in seen


# -- failures leave nothing behind ------------------------------------------------------
def _reuse_tower(monkeypatch: pytest.MonkeyPatch, tiny_repository: Path, model: str) -> None:
    """Skip re-exporting the tiny weights: copy the tiny repository's (real) ONNX tower."""

    def export(_model, path: Path, *args, **kwargs) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "model.onnx.data"):  # the graph and its external weights
            shutil.copyfile(tiny_repository / model / "1" / name, path.with_name(name))

    name = "export_vision" if model == VISION_MODEL else "export_text"
    monkeypatch.setattr(onnx_export, name, export)


@pytest.fixture
def reuse_towers(monkeypatch: pytest.MonkeyPatch, tiny_repository: Path) -> None:
    """Exports of the tiny model (seed TINY_SEED) reuse the session's towers."""
    _reuse_tower(monkeypatch, tiny_repository, VISION_MODEL)
    _reuse_tower(monkeypatch, tiny_repository, TEXT_MODEL)


def test_wrong_tower_fails_the_gate_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tiny_repository: Path, tmp_path: Path
) -> None:
    """A genuinely wrong vision graph (exported from a perturbed forward) is refused."""
    original = onnx_export.VisionTower.forward

    def perturbed(self, pixel_values):
        return torch.nn.functional.normalize(original(self, pixel_values) + 0.3, dim=-1)

    monkeypatch.setattr(onnx_export.VisionTower, "forward", perturbed)
    _reuse_tower(monkeypatch, tiny_repository, TEXT_MODEL)  # the text tower is right
    output = tmp_path / "repo"
    with pytest.raises(ParityError, match="vision min cosine"):
        export_repository(_options(output))
    assert not output.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.usefixtures("reuse_towers")
def test_impossible_threshold_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "repo"
    with pytest.raises(ParityError, match=r"threshold 1\.000001"):
        export_repository(_options(output, fp32_min_cosine=1.000001))
    assert not output.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.usefixtures("reuse_towers")
def test_cli_exits_non_zero_when_towers_do_not_match_the_weights(tmp_path: Path) -> None:
    """Towers of seed TINY_SEED against PyTorch weights of another seed: the gate says no."""
    from clipserve.export.cli import EXIT_PARITY

    output = tmp_path / "repo"
    args = _cli_args(output, "--seed", "999")
    assert args.run(args) == EXIT_PARITY
    assert not output.exists()
    assert _leftovers(tmp_path) == []


def _cli_args(output: Path, *extra: str):
    """Parsed `clipserve export` arguments for the tiny model (later flags win)."""
    from clipserve.cli import build_parser

    return build_parser().parse_args(
        ["export", "--model", TINY_MODEL, "--pretrained", "none", "--seed", str(TINY_SEED),
         "--output", str(output), *extra]
    )


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    output = tmp_path / "repo"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        export_repository(_options(output))
    args = _cli_args(output)
    assert args.run(args) == 2
    assert (output / "keep.txt").read_text() == "precious"


@pytest.mark.usefixtures("reuse_towers")
def test_force_replaces_the_output(tmp_path: Path) -> None:
    output = tmp_path / "repo"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    args = _cli_args(output, "--force", "--max-batch-size", "8")
    assert args.run(args) == 0
    assert not (output / "stale.txt").exists()
    assert load_manifest(output).source.model_name == TINY_MODEL
    assert "max_batch_size: 8" in (output / VISION_MODEL / "config.pbtxt").read_text()
    assert _leftovers(tmp_path) == []


@pytest.mark.usefixtures("reuse_towers")
def test_checkpoint_file_is_loaded_and_hashed(tiny_torch_model, tmp_path: Path) -> None:
    """--checkpoint FILE: open_clip's own loading of a local state dict; sha256 recorded."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_torch_model.state_dict().items()}, checkpoint)
    output = tmp_path / "repo"
    export_repository(_options(output, pretrained=None, checkpoint=checkpoint, seed=999))
    manifest = load_manifest(output)
    assert manifest.source.pretrained == "checkpoint"
    assert manifest.source.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


@pytest.mark.usefixtures("reuse_towers")
def test_pretrained_tag_brings_its_weights_and_preprocessing(
    monkeypatch: pytest.MonkeyPatch, tiny_torch_model, tmp_path: Path
) -> None:
    """A tag resolved through open_clip's registry (a local file: no network) sets the
    manifest's preprocessing to the tag's, not open_clip's defaults."""
    from open_clip import pretrained

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_torch_model.state_dict(), checkpoint)
    tag = {"file": str(checkpoint), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
           "interpolation": "bilinear", "resize_mode": "squash"}
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_MODEL, {"tinytag": tag})
    output = tmp_path / "repo"
    export_repository(_options(output, pretrained="tinytag", seed=999))
    manifest = load_manifest(output)
    assert manifest.source.pretrained == "tinytag"
    assert manifest.source.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest.preprocess.mean == (0.5, 0.5, 0.5)
    assert manifest.preprocess.std == (0.25, 0.25, 0.25)
    assert (manifest.preprocess.interpolation, manifest.preprocess.resize_mode) == (
        "bilinear",
        "squash",
    )


# -- loading errors -----------------------------------------------------------------------
def test_hub_failure_says_why_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tiny_model: str, tmp_path: Path
) -> None:
    """No network here, so the hub call fails; offline mode makes it fail at once instead of
    after huggingface_hub's retries (about a minute)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    output = tmp_path / "repo"
    options = ExportOptions(model="ViT-B-32", pretrained="laion2b_s34b_b79k", output=output)
    with pytest.raises(ExportError) as caught:
        export_repository(options)
    message = str(caught.value)
    assert "could not download" in message
    assert "no network" in message
    assert "--checkpoint FILE" in message
    assert "--pretrained none" in message
    assert not output.exists()
    assert _leftovers(tmp_path) == []


def test_unknown_tag_lists_the_known_ones(tiny_model: str, tmp_path: Path) -> None:
    options = ExportOptions(model="ViT-L-14", pretrained="no_such_tag", output=tmp_path / "r")
    with pytest.raises(ExportError, match=r"unknown for model 'ViT-L-14'.*datacomp_xl_s13b_b90k"):
        export_repository(options)


@pytest.mark.usefixtures("reuse_towers")
def test_builtin_checkpoint_is_the_default(
    monkeypatch: pytest.MonkeyPatch, tiny_torch_model, tmp_path: Path
) -> None:
    """No --pretrained, no --checkpoint: a model's built-in checkpoint (export/models.py)."""
    from safetensors.torch import save_file

    from clipserve.export import models

    checkpoint = tmp_path / "builtin.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_torch_model.state_dict().items()}, checkpoint)
    monkeypatch.setattr(
        models, "builtin_checkpoint", lambda name: checkpoint if name == TINY_MODEL else None
    )
    output = tmp_path / "repo"
    export_repository(ExportOptions(model=TINY_MODEL, output=output, seed=999))
    assert load_manifest(output).source.pretrained == "builtin"


def test_model_without_builtin_checkpoint_or_tag_needs_a_flag(
    tiny_model: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"no built-in checkpoint.*--pretrained none"):
        export_repository(ExportOptions(model=tiny_model, output=tmp_path / "r"))


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown model"):
        export_repository(ExportOptions(model="ViT-Nope", output=tmp_path / "r"))


def test_hf_text_tower_is_refused_with_a_clear_message(tiny_model: str) -> None:
    from open_clip.model import CustomTextCLIP

    model = CustomTextCLIP(
        embed_dim=8,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"width": 32, "heads": 2, "layers": 1, "pool_type": "last"},
    )
    with pytest.raises(ExportError, match="depends on the padding"):
        onnx_export.TextTower(model)
    model.text = torch.nn.Identity()
    with pytest.raises(ExportError, match="Hugging Face text model"):
        onnx_export.TextTower(model)


def test_manifest_is_json_with_sorted_keys(tiny_repository: Path) -> None:
    data = json.loads((tiny_repository / MANIFEST_NAME).read_text())
    assert list(data) == sorted(data)
    text = (tiny_repository / MANIFEST_NAME).read_text()
    assert str(tiny_repository.parent) not in text  # relative paths only: the folder can move

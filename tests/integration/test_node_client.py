"""The Node.js client (clients/node) against a real server, checked against the Python client.

`clip_server` (tests/integration/conftest.py) is the real clipserve server on the tiny model
repository. The Node example runs as a subprocess on real photographs (scikit-image's chelsea,
astronaut and coffee, encoded here as JPEG and PNG); its JSON output must equal what the
Python `ClipClient` gets from the same server for the same requests: embeddings within 1e-6 per
component, the same labels and candidates in the same order, probabilities within 1e-6, and
the same error (code and message naming the item) for a corrupt image.

Node.js and npm are required, not optional: without them these tests fail and say so. When
clients/node/node_modules is missing, the `node_client` fixture runs `npm ci` there once.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.clients import ClipClient, InvalidArgumentError
from tests.integration.harness import running_server

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE_DEPENDENCIES = ("@grpc/grpc-js", "@grpc/proto-loader")
MIN_NODE_MAJOR = 18
# Same server, same requests: the only differences allowed are float32 round-off.
ATOL = 1e-6
TEXT = "a photo of a cat"
LABELS = ["cat", "dog", "person", "cup of coffee", "car"]
CANDIDATES = [
    "a photo of a cat",
    "an astronaut in a space suit",
    "a cup of coffee on a table",
    "a red sports car",
]
TOP_K = 3


# ---- fixtures ------------------------------------------------------------------------------


def _installed() -> bool:
    modules = NODE_DIR / "node_modules"
    return all((modules / name / "package.json").is_file() for name in NODE_DEPENDENCIES)


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with clients/node's dependencies installed (`npm ci` if needed)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH: install Node.js >= {MIN_NODE_MAJOR} for clients/node")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        pytest.fail(f"clients/node needs Node.js >= {MIN_NODE_MAJOR}, found {version}")
    if not _installed():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not on PATH: it is needed to install clients/node's dependencies")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0 or not _installed():
            pytest.fail(f"`npm ci` in {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}")
    return node


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """chelsea.jpg, astronaut.png and coffee.jpg from scikit-image's bundled photographs."""
    from skimage import data

    folder = tmp_path_factory.mktemp("node_images")
    paths = []
    for name, fmt, suffix in [
        ("chelsea", "JPEG", "jpg"), ("astronaut", "PNG", "png"), ("coffee", "JPEG", "jpg")
    ]:
        path = folder / f"{name}.{suffix}"
        path.write_bytes(_encode(getattr(data, name)(), fmt))
        paths.append(path)
    return paths


def _example(node: str, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`node example.js --json ...` against ``address``; its environment names no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    return subprocess.run(
        [node, "example.js", "--target", address, "--json", *args],
        cwd=NODE_DIR, capture_output=True, text=True, env=env, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def node_result(node: str, address: str, images: list[Path]) -> dict[str, Any]:
    candidate_args = [arg for text in CANDIDATES for arg in ("--candidate", text)]
    done = _example(
        node, address, "--text", TEXT, "--labels", ",".join(LABELS), "--top-k", str(TOP_K),
        *candidate_args, *map(str, images),
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ---- the example against the Python client -------------------------------------------------


def test_model_info_matches(node_result: dict[str, Any], client: ClipClient) -> None:
    info = client.info()
    assert node_result["model"] == {
        "modelName": info.model_name,
        "pretrained": info.pretrained,
        "embeddingDim": info.embedding_dim,
        "executionProvider": info.execution_provider,
        "visionInstances": info.vision_batching.instances,
    }


def test_text_embedding_matches(node_result: dict[str, Any], client: ClipClient) -> None:
    expected = client.encode_text([TEXT])[0]
    got = np.asarray(node_result["text"]["embedding"], dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_image_embeddings_match(
    node_result: dict[str, Any], client: ClipClient, images: list[Path]
) -> None:
    expected = client.encode_image([path.read_bytes() for path in images])  # [3, D]
    got = np.asarray([item["embedding"] for item in node_result["images"]], dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_classification_matches(
    node_result: dict[str, Any], client: ClipClient, images: list[Path]
) -> None:
    expected = client.classify([p.read_bytes() for p in images], LABELS, top_k=TOP_K)
    got = node_result["classifications"]
    assert [item["path"] for item in got] == [str(p) for p in images]
    for node_labels, python_labels in zip((item["labels"] for item in got), expected, strict=True):
        assert [(s["label"], s["index"]) for s in node_labels] == [
            (s.label, s.index) for s in python_labels
        ]
        np.testing.assert_allclose(
            [s["probability"] for s in node_labels],
            [s.probability for s in python_labels], rtol=0, atol=ATOL,
        )
        np.testing.assert_allclose(
            [s["score"] for s in node_labels], [s.score for s in python_labels], rtol=0, atol=ATOL
        )


def test_rank_matches(
    node_result: dict[str, Any], client: ClipClient, images: list[Path]
) -> None:
    expected = client.rank(images[0].read_bytes(), CANDIDATES)
    got = node_result["rank"]["results"]
    assert [c["index"] for c in got] == [c.index for c in expected]
    assert [c["text"] for c in got] == [CANDIDATES[c.index] for c in expected]
    np.testing.assert_allclose(
        [c["score"] for c in got], [c.score for c in expected], rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(
        [c["probability"] for c in got], [c.probability for c in expected], rtol=0, atol=ATOL
    )


def test_corrupt_image_is_the_same_invalid_argument(
    node: str, address: str, client: ClipClient, images: list[Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with pytest.raises(InvalidArgumentError) as raised:
        client.encode_image([images[0].read_bytes(), corrupt.read_bytes()])

    done = _example(node, address, str(images[0]), str(corrupt))
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    error = json.loads(done.stdout)["error"]
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error["codeName"] == "INVALID_ARGUMENT"
    assert error["method"] == "EncodeImage"
    assert error["details"].startswith("images[1]: ")
    assert error["details"] == raised.value.message


def test_bearer_token_reaches_the_server(
    node: str, tiny_repository: Path, images: list[Path], tmp_path: Path
) -> None:
    token = "node-client-test-token"
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    token_file = tmp_path / "token"
    token_file.write_text(token)
    with running_server(tiny_repository, auth_token_file=str(tokens)) as server:
        refused = _example(node, server.address, str(images[0]))
        accepted = _example(node, server.address, "--token-file", str(token_file), str(images[0]))
    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout)["error"]["codeName"] == "UNAUTHENTICATED"
    assert accepted.returncode == 0, accepted.stderr
    assert token not in refused.stdout + refused.stderr


# ---- the library itself --------------------------------------------------------------------

FORMATS_SCRIPT = """
import { ClipClient } from './src/index.js';
const [target, text] = process.argv.slice(1);
const client = new ClipClient(target);
const out = {};
for (const embeddingFormat of ['float', 'fp32_bytes', 'fp16_bytes']) {
  const [v] = await client.encodeText([text], { embeddingFormat });
  out[embeddingFormat] = Array.from(v);
}
client.close();
console.log(JSON.stringify(out));
"""


def test_every_embedding_format_decodes_like_python(
    node: str, address: str, client: ClipClient
) -> None:
    done = subprocess.run(
        [node, "--input-type=module", "-e", FORMATS_SCRIPT, address, TEXT],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    got = {fmt: np.asarray(v, dtype=np.float32) for fmt, v in json.loads(done.stdout).items()}
    for fmt in ("float", "fp32_bytes", "fp16_bytes"):
        expected = client.encode_text([TEXT], embedding_format=fmt)[0]  # type: ignore[arg-type]
        np.testing.assert_array_equal(got[fmt], expected, err_msg=fmt)


def test_node_unit_tests(node: str) -> None:
    """clients/node/test/*.test.js (pure helpers and the call loop on a fake stub)."""
    files = sorted(str(p.relative_to(NODE_DIR)) for p in (NODE_DIR / "test").glob("*.test.js"))
    assert files
    done = subprocess.run(
        [node, "--test", *files], cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

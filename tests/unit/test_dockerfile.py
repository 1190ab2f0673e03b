"""The Dockerfile's images have the properties the deployment relies on.

No container engine runs in CI: hadolint and checkov lint the Dockerfile (.ci/k8s.sh), which also
runs the serving images' install steps (docker/install-server.sh) in a fresh virtual environment.
These tests read the Dockerfile itself for what neither linter knows about clipserve.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clipserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
SERVING = ("server-gpu", "server-cpu")
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
)
METRICS_PORT = 8002  # Triton's, where the server serves /metrics
HTTP_PORT = 8000  # the OpenAI-compatible HTTP API, off unless CLIPSERVE_HTTP_PORT sets it


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    @property
    def text(self) -> str:
        return "\n".join(f"{kw} {args}" for kw, args in self.instructions)


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: logical lines (continuations joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert match, line
            stages.append(Stage(base=match.group(1), name=match.group(2) or str(len(stages))))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def labels(stage: Stage) -> dict[str, str]:
    found: dict[str, str] = {}
    for args in stage.all("LABEL"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            found[key] = value
    return found


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse(ROOT / "Dockerfile")}


def test_the_default_target_is_the_gpu_server() -> None:
    assert parse(ROOT / "Dockerfile")[-1].name == "server-gpu"


def test_no_image_has_a_healthcheck(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        assert not stage.all("HEALTHCHECK"), f"{stage.name}: Kubernetes probes do that"


@pytest.mark.parametrize("target", [*SERVING, "export"])
def test_images_run_as_a_non_root_user(stages: dict[str, Stage], target: str) -> None:
    user = stages[target].last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric uid lets the kubelet check runAsNonRoot"
    assert int(uid) >= 10000
    assert int(uid) == 10001  # the runAsUser of the manifests


@pytest.mark.parametrize("target", [*SERVING, "export"])
def test_images_carry_oci_labels(stages: dict[str, Stage], target: str) -> None:
    found = labels(stages[target])
    required = OCI_LABELS if target in SERVING else OCI_LABELS[:4]
    missing = [label for label in required if not found.get(label)]
    assert not missing, f"{target} lacks {missing}"
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"


@pytest.mark.parametrize("target", SERVING)
def test_serving_images_start_the_server_as_pid_1(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    assert json.loads(stage.last("ENTRYPOINT")) == ["clipserve"]  # exec form: gets SIGTERM
    assert json.loads(stage.last("CMD")) == ["serve"]
    exposed = {int(port) for port in stage.last("EXPOSE").split()}
    assert exposed == {ServerSettings().port, METRICS_PORT, HTTP_PORT}


@pytest.mark.parametrize("target", SERVING)
def test_serving_images_write_only_to_tmp(stages: dict[str, Stage], target: str) -> None:
    env = " ".join(stages[target].all("ENV"))
    assert "HOME=/tmp" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert stages[target].last("WORKDIR") == "/tmp"


@pytest.mark.parametrize(("target", "flavour"), [("server-gpu", "gpu"), ("server-cpu", "cpu")])
def test_serving_images_are_built_by_the_ci_checked_script_without_torch(
    stages: dict[str, Stage], target: str, flavour: str
) -> None:
    final = stages[target]
    [venv_stage] = {
        m.group(1) for args in final.all("COPY") if (m := re.search(r"--from=(\S+)", args))
    }
    builder = stages[venv_stage]
    run = " ".join(builder.all("RUN"))
    install = "install-server.sh /opt/clipserve /dist/clipserve-*.whl /build/constraints.txt"
    assert f"{install} {flavour}" in run
    assert f"check-server.sh /opt/clipserve {flavour}" in run
    for stage in (final, builder):
        assert "torch" not in stage.text
        assert "[export]" not in stage.text


def test_the_gpu_image_matches_its_cuda_base(stages: dict[str, Stage]) -> None:
    assert stages["server-gpu"].base == stages["server-gpu-venv"].base == "${CUDA_IMAGE}"
    assert stages["server-cpu"].base == stages["server-cpu-venv"].base == "${PYTHON_IMAGE}"


def test_the_export_image_installs_the_export_extra(stages: dict[str, Stage]) -> None:
    run = " ".join(stages["export"].all("RUN"))
    assert "[export]" in run
    assert "clipserve export --help" in run


def test_the_build_context_is_an_allowlist_covering_every_copy(stages: dict[str, Stage]) -> None:
    rules = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "start from nothing, then allow what the images need"
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    for stage in stages.values():
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _destination = args.split()
            for source in sources:
                assert any(
                    source.rstrip("/") == entry or source.startswith(entry + "/")
                    for entry in allowed
                ), f"COPY {source} is not in .dockerignore's allowlist"
                assert (ROOT / source).exists(), source


def test_the_install_scripts_exist() -> None:
    for name in ("install-server.sh", "check-server.sh"):
        script = ROOT / "docker" / name
        assert script.read_text().startswith("#!/bin/sh\n")
        assert "set -eu" in script.read_text()

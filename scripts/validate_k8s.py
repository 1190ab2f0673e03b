"""Validate rendered Kubernetes manifests strictly against pinned schemas.

    python scripts/validate_k8s.py k8s/rendered/*.yaml

Run by .ci/k8s.sh in its own environment (kubernetes-validate, cloudcoil's prometheus-operator
models); the project's environment does not need them. Every document must pass, and a kind
this script has no schema for is an error, not a warning:

- built-in kinds: the OpenAPI schemas of Kubernetes ``KUBERNETES_VERSION`` (kubernetes-validate),
  strict: an unknown field anywhere fails.
- ServiceMonitor (monitoring.coreos.com/v1, a CRD): the pydantic models that cloudcoil generates
  from the prometheus-operator CRD schema (``PROMETHEUS_OPERATOR_MODELS``), with unknown fields
  forbidden and field names taken only as the CRD spells them.
- InferenceService (serving.kserve.io/v1beta1, a CRD): no package on the registries we can reach
  ships KServe's CRD schema, so it is checked in part: the predictor minus KServe's component
  fields must be a valid PodSpec (strict, as a Pod of the pinned Kubernetes version), and those
  component fields must be ones KServe defines (``KSERVE_PREDICTOR_FIELDS``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from pydantic import ValidationError

KUBERNETES_VERSION = "1.37.0"
PROMETHEUS_OPERATOR_MODELS = "cloudcoil-models-prometheus-operator 0.80.1.0"

#: PredictorSpec fields that KServe adds to the inline PodSpec (its ComponentExtensionSpec and the
#: model-format specs), from KServe's v1beta1 API reference.
KSERVE_PREDICTOR_FIELDS = frozenset({
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy", "autoScaling", "workerSpec", "model", "sklearn",
    "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
    "paddle",
})
KSERVE_SPEC_FIELDS = frozenset({"predictor", "transformer", "explainer"})


def documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            yield doc


def check_builtin(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def check_service_monitor(doc: dict[str, Any]) -> None:
    ServiceMonitor.model_validate(doc, extra="forbid", by_alias=True, by_name=False)


def check_inference_service(doc: dict[str, Any]) -> None:
    if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
        raise ValueError(f"unexpected apiVersion {doc.get('apiVersion')!r}")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    unknown |= set(doc["spec"]) - KSERVE_SPEC_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    predictor = copy.deepcopy(doc["spec"]["predictor"])
    for name in KSERVE_PREDICTOR_FIELDS:
        predictor.pop(name, None)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": doc["metadata"]["name"], **_namespace(doc)},
        "spec": predictor,
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def _namespace(doc: dict[str, Any]) -> dict[str, str]:
    namespace = doc["metadata"].get("namespace")
    return {"namespace": namespace} if namespace else {}


CHECKS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        check_service_monitor, f"prometheus-operator CRD schema ({PROMETHEUS_OPERATOR_MODELS})"
    ),
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        check_inference_service, f"PodSpec part, Kubernetes {KUBERNETES_VERSION}"
    ),
}


def validate(path: Path) -> int:
    failures = 0
    for doc in documents(path):
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        what = f"{path}: {key[1]}/{doc.get('metadata', {}).get('name', '?')}"
        check, against = CHECKS.get(key, (check_builtin, f"Kubernetes {KUBERNETES_VERSION}"))
        try:
            check(doc)
        except (kubernetes_validate.ValidationError, ValidationError, ValueError) as exc:
            print(f"FAIL {what} against {against}:\n{exc}")
            failures += 1
        except kubernetes_validate.SchemaNotFoundError:
            print(f"FAIL {what}: no schema for {key[0]} {key[1]} (add a check for it)")
            failures += 1
        else:
            print(f"ok   {what} ({against}, strict)")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    failures = sum(validate(path) for path in args.files)
    if failures:
        print(f"{failures} manifest(s) failed validation")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

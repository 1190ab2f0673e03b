"""The call layer wraps clipserve's unary handlers once, at registration, and nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from clipserve.server.access_log import AccessLog
from clipserve.server.call_layer import CallLayer
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc


class Recorder:
    """Collects what the generated ``add_*Servicer_to_server`` functions register."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic += list(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered[service] = handlers


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def lookup(recorder: Recorder, method: str) -> grpc.RpcMethodHandler | None:
    for handler in recorder.generic:
        found = handler.service(Details(method))
        if found is not None:
            return found
    return None


def test_clipservice_handlers_are_wrapped_once_and_parse_inside() -> None:
    layer = CallLayer(AccessLog(log_calls=False))
    recorder = Recorder()
    pb_grpc.add_ClipServiceServicer_to_server(
        pb_grpc.ClipServiceServicer(), layer.registrar(recorder)  # type: ignore[arg-type]
    )
    method = "/clipserve.v1.ClipService/EncodeText"
    first = lookup(recorder, method)
    assert first is not None
    assert layer.made(method, first)
    assert lookup(recorder, method) is first  # the same handler on every call: wrapped once
    # the layer parses (after the token check), so gRPC hands it bytes
    assert first.request_deserializer is None
    assert first.response_serializer is not None
    # the registered copy of the handlers is the same wrapped handler, not a second one
    assert recorder.registered["clipserve.v1.ClipService"]["EncodeText"] is first


def test_unknown_methods_are_neither_served_nor_remembered() -> None:
    layer = CallLayer(AccessLog(log_calls=False))
    recorder = Recorder()
    pb_grpc.add_ClipServiceServicer_to_server(
        pb_grpc.ClipServiceServicer(), layer.registrar(recorder)  # type: ignore[arg-type]
    )
    for i in range(100):  # any caller can send any name: they must not grow a cache
        assert lookup(recorder, f"/clipserve.v1.ClipService/Nope{i}") is None
    known = {f"/clipserve.v1.ClipService/{name}"
             for name in recorder.registered["clipserve.v1.ClipService"]}
    assert set(layer._wrapped) == known  # the service's own methods, nothing more


def test_other_services_are_registered_unchanged() -> None:
    layer = CallLayer(AccessLog(log_calls=False))
    plain, through_layer = Recorder(), Recorder()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, plain)  # type: ignore[arg-type]
    health_pb2_grpc.add_HealthServicer_to_server(
        servicer, layer.registrar(through_layer)  # type: ignore[arg-type]
    )
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        handler = lookup(through_layer, method)
        assert handler is not None
        assert not layer.made(method, handler)
        expected = lookup(plain, method)
        assert expected is not None
        assert handler.request_deserializer == expected.request_deserializer
        assert (handler.unary_unary, handler.unary_stream) == (
            expected.unary_unary, expected.unary_stream
        )

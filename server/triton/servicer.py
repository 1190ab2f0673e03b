"""`inference.GRPCInferenceService`: a thin adapter from the KServe v2 / Triton protocol to
`ClipModel`, on the same batchers as clipserve.v1.ClipService.

Errors are raised as domain errors; `call_layer` turns them into statuses
(unknown model or version: NOT_FOUND; bad tensors: INVALID_ARGUMENT naming the tensor).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc

from clipserve import __version__
from clipserve.server import trace as trace_mod
from clipserve.server.errors import InvalidInput, NotFound
from clipserve.server.model import ClipModel
from clipserve.server.triton import codec, infer, models
from clipserve.server.triton.models import TritonModel
from clipserve.server.triton.statistics import TritonStatistics
from clipserve.triton import grpc_service_pb2 as pb
from clipserve.triton import grpc_service_pb2_grpc as pb_grpc

SERVER_NAME = "clipserve"
#: Protocol extensions served in full (RepositoryIndex alone is not all of model_repository).
EXTENSIONS = ("model_configuration", "statistics")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class TritonServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        model: ClipModel,
        triton_models: Mapping[str, TritonModel],
        statistics: TritonStatistics,
        provider: str,
    ) -> None:
        self._model = model
        self._models = triton_models
        self._stats = statistics
        self._configs = {name: models.config(m, provider) for name, m in triton_models.items()}

    def _lookup(self, name: str, version: str) -> TritonModel:
        found = self._models.get(name)
        if found is None:
            raise NotFound(
                f"unknown model {name!r}; this server serves " + ", ".join(sorted(self._models))
            )
        if version not in ("", models.VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has {models.VERSION!r}")
        return found

    # -- health and metadata -----------------------------------------------------------------
    async def ServerLive(  # noqa: N802 - gRPC method name
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._model.ready)

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        known = request.name in self._models and request.version in ("", models.VERSION)
        return pb.ModelReadyResponse(ready=known and self._model.ready)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return models.metadata(self._lookup(request.name, request.version))

    async def ModelConfig(  # noqa: N802
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._lookup(request.name, request.version)
        return pb.ModelConfigResponse(config=self._configs[model.name])

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            names = [self._lookup(request.name, request.version).name]
        else:
            names = list(self._models)
        return pb.ModelStatisticsResponse(model_stats=[self._stats.message(n) for n in names])

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        ready = self._model.ready
        if request.ready and not ready:
            return pb.RepositoryIndexResponse()
        state = "READY" if ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=n, version=models.VERSION, state=state)
                for n in self._models
            ]
        )

    # -- inference ---------------------------------------------------------------------------
    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        spec = self._lookup(request.model_name, request.model_version)
        started = time.perf_counter_ns()
        ok, output_ns = False, 0
        with trace_mod.bound() as trace, self._stats.handling(spec.name):
            trace.model = spec.name
            try:
                with self._model.admit():
                    with trace.timing_input():
                        tensor = spec.check_inputs(codec.decode_inputs(request))
                        spec.check_outputs([o.name for o in request.outputs])
                        truncate = _bool_parameter(request, "truncate", default=True)
                    embeddings = await infer.embed(
                        self._model, spec, tensor, _deadline(context), truncate=truncate
                    )
                output_started = time.perf_counter_ns()
                response = pb.ModelInferResponse(
                    model_name=spec.name, model_version=models.VERSION, id=request.id
                )
                # answer in the form the request used: raw contents, or typed contents
                output, raw = codec.encode_output(
                    spec.output.name, embeddings, raw=bool(request.raw_input_contents)
                )
                response.outputs.append(output)
                if raw is not None:
                    response.raw_output_contents.append(raw)
                output_ns = time.perf_counter_ns() - output_started
                ok = True
            finally:
                self._stats.record(
                    spec.name, ok=ok, duration_ns=time.perf_counter_ns() - started, trace=trace,
                    output_ns=output_ns,
                )
        return response


def _bool_parameter(request: pb.ModelInferRequest, name: str, *, default: bool) -> bool:
    if name not in request.parameters:
        return default
    parameter = request.parameters[name]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(f"parameter {name!r} must be a bool")
    return parameter.bool_param

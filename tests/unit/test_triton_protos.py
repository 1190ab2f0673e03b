"""clipserve's `inference` protos are wire compatible with tritonclient's (2.73).

Every message, field and enum value clipserve defines must exist in tritonclient's descriptors
with the same name, number, type and label; the service path must be the same. Both sets of
generated modules import in one process because clipserve's live in a private descriptor pool.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from clipserve.triton import DESCRIPTOR_POOL
from clipserve.triton import grpc_service_pb2 as ours
from clipserve.triton import model_config_pb2 as ours_config

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
theirs = tritonclient_grpc.service_pb2
theirs_config = tritonclient_grpc.model_config_pb2


def _messages(file: FileDescriptor) -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}

    def walk(message: Descriptor) -> None:
        found[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def _enums(file: FileDescriptor) -> dict[str, EnumDescriptor]:
    enums = {e.full_name: e for e in file.enum_types_by_name.values()}
    for message in _messages(file).values():
        enums.update({e.full_name: e for e in message.enum_types})
    return enums


PAIRS = [(ours.DESCRIPTOR, theirs.DESCRIPTOR), (ours_config.DESCRIPTOR, theirs_config.DESCRIPTOR)]


@pytest.mark.parametrize(("mine", "reference"), PAIRS, ids=["grpc_service", "model_config"])
def test_every_field_matches_tritonclient(mine: FileDescriptor, reference: FileDescriptor) -> None:
    assert mine.package == reference.package == "inference"
    theirs_by_name = _messages(reference)
    for name, message in _messages(mine).items():
        assert name in theirs_by_name, f"{name} is not in tritonclient's {reference.name}"
        other = theirs_by_name[name]
        for field in message.fields:
            assert field.name in other.fields_by_name, f"{name}.{field.name} is not Triton's"
            ref = other.fields_by_name[field.name]
            assert (field.number, field.type, field.is_repeated) == (
                ref.number, ref.type, ref.is_repeated
            ), f"{name}.{field.name} differs from Triton's"
            if field.message_type is not None:
                assert field.message_type.full_name == ref.message_type.full_name
            if field.enum_type is not None:
                assert field.enum_type.full_name == ref.enum_type.full_name
            if field.containing_oneof is not None:
                assert field.containing_oneof.name == ref.containing_oneof.name


@pytest.mark.parametrize(("mine", "reference"), PAIRS, ids=["grpc_service", "model_config"])
def test_every_enum_value_matches_tritonclient(
    mine: FileDescriptor, reference: FileDescriptor
) -> None:
    theirs_by_name = _enums(reference)
    for name, enum in _enums(mine).items():
        expected = {v.name: v.number for v in theirs_by_name[name].values}
        assert {v.name: v.number for v in enum.values} == expected, name


def test_the_service_methods_are_tritons() -> None:
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    other = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert mine.full_name == "inference.GRPCInferenceService"
    for method in mine.methods:
        ref = other.methods_by_name[method.name]
        assert method.input_type.full_name == ref.input_type.full_name
        assert method.output_type.full_name == ref.output_type.full_name


def test_the_stubs_use_a_private_descriptor_pool() -> None:
    assert ours.DESCRIPTOR.pool is DESCRIPTOR_POOL
    assert theirs.DESCRIPTOR.pool is not DESCRIPTOR_POOL


def test_a_request_round_trips_between_the_two_definitions() -> None:
    request = ours.ModelInferRequest(model_name="clip_vision", id="7", raw_input_contents=[b"x"])
    request.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 224, 224])
    request.parameters["truncate"].bool_param = False
    decoded = theirs.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.inputs[0].shape == [1, 3, 224, 224]
    assert decoded.parameters["truncate"].bool_param is False
    assert ours.ModelInferRequest.FromString(decoded.SerializeToString()) == request

"""Channel settings shared by the sync and async clients: options, credentials, metadata.

Pure functions of a `ChannelSettings`; nothing here opens a connection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from clipserve import __version__

LoadBalancing = Literal["round_robin", "pick_first"]
LOAD_BALANCING_POLICIES: tuple[str, ...] = ("round_robin", "pick_first")

DEFAULT_TARGET = "localhost:8001"
DEFAULT_MAX_MESSAGE_LENGTH = 64 * 1024 * 1024
"""64 MiB both ways: a batch of encoded images or of 1024-d float embeddings can pass gRPC's
4 MiB receive default. The server enforces its own limit on what it receives."""

ChannelOption = tuple[str, Any]


@dataclass(frozen=True)
class ChannelSettings:
    """How a client connects. See the `ClipClient` docstring for each field."""

    target: str = DEFAULT_TARGET
    load_balancing: LoadBalancing | None = None
    max_receive_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH
    max_send_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH
    keepalive_time_s: float | None = None
    keepalive_timeout_s: float = 20.0
    keepalive_permit_without_calls: bool = False
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    options: Sequence[ChannelOption] = ()

    def __post_init__(self) -> None:
        if self.load_balancing is not None and self.load_balancing not in LOAD_BALANCING_POLICIES:
            raise ValueError(
                f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)} or None, "
                f"got {self.load_balancing!r}"
            )
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain")
        if self.keepalive_time_s is not None and self.keepalive_time_s <= 0:
            raise ValueError(f"keepalive_time_s must be > 0, got {self.keepalive_time_s}")

    @property
    def secure(self) -> bool:
        """TLS is on: asked for, or implied by a CA bundle or a client certificate."""
        return self.tls or self.root_certificates is not None or self.private_key is not None


#: Health service the client watches with round_robin (the server's grpc.health.v1 name).
HEALTH_SERVICE = "clipserve.v1.ClipService"


def service_config(load_balancing: LoadBalancing) -> str:
    """The ``grpc.service_config`` JSON that selects a client-side load-balancing policy.

    With round_robin the channel also watches each backend's grpc.health.v1 status, so a
    draining server (NOT_SERVING) leaves the rotation at once instead of refusing calls until
    its port closes.
    """
    config: dict[str, object] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if load_balancing == "round_robin":
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE}
    return json.dumps(config)


def channel_options(settings: ChannelSettings) -> list[ChannelOption]:
    """gRPC channel arguments for ``settings``; entries of ``settings.options`` win over ours."""
    opts: dict[str, Any] = {
        "grpc.max_receive_message_length": settings.max_receive_message_length,
        "grpc.max_send_message_length": settings.max_send_message_length,
        "grpc.primary_user_agent": f"clipserve-python/{__version__}",
    }
    if settings.load_balancing is not None:
        opts["grpc.service_config"] = service_config(settings.load_balancing)
    if settings.keepalive_time_s is not None:
        opts["grpc.keepalive_time_ms"] = round(settings.keepalive_time_s * 1000)
        opts["grpc.keepalive_timeout_ms"] = round(settings.keepalive_timeout_s * 1000)
        opts["grpc.keepalive_permit_without_calls"] = int(settings.keepalive_permit_without_calls)
        # Keep pinging an idle connection; the server's min ping interval must allow it.
        opts["grpc.http2.max_pings_without_data"] = 0
    if settings.server_name is not None:
        opts["grpc.ssl_target_name_override"] = settings.server_name
    opts.update(dict(settings.options))
    return list(opts.items())


def channel_credentials(settings: ChannelSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel."""
    if not settings.secure:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.private_key,
        certificate_chain=settings.certificate_chain,
    )


def call_metadata(settings: ChannelSettings) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the bearer token, if any."""
    if settings.token is None:
        return ()
    return (("authorization", f"Bearer {settings.token}"),)

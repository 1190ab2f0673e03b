"""TLS and mutual TLS for the gRPC port and the HTTP API, from PEM files named by the settings."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc

from clipserve.server.settings import ConfigError, ServerSettings

log = logging.getLogger(__name__)


def _read(setting: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {path} holds no PEM block")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when `tls_cert` is set (mutual TLS with `tls_client_ca`), else None."""
    if not settings.tls_cert:
        return None
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    client_ca = _read("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    # gRPC reports an unusable pair (a key of another certificate, say) only when the port is
    # bound, as a failure to bind: check it here, with the same message as the HTTP API's, but
    # at OpenSSL's security level 0, so that what gRPC itself accepts (RSA-1024, say) passes
    _ssl_context(settings, security_level=0)
    log.info("TLS on%s", " with client certificates required (mTLS)" if client_ca else "")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The same TLS (and mTLS) as `server_credentials`, for the HTTP API; None without TLS."""
    if not settings.tls_cert:
        return None
    return _ssl_context(settings)


def _ssl_context(settings: ServerSettings, security_level: int | None = None) -> ssl.SSLContext:
    _read("tls_cert", settings.tls_cert)  # the same checks and messages as for gRPC
    _read("tls_key", settings.tls_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if security_level is not None:
        context.set_ciphers(f"DEFAULT:@SECLEVEL={security_level}")
    try:
        # never OpenSSL's interactive password prompt: an encrypted key (which gRPC cannot
        # use either) is refused as unusable
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
        if settings.tls_client_ca:
            _read("tls_client_ca", settings.tls_client_ca)
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        why = exc.reason or "an encrypted key? clipserve needs it unencrypted"
        raise ConfigError(f"tls_cert, tls_key or tls_client_ca: unusable ({why})") from None
    return context

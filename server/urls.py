"""Fetching `Image.url` inputs without becoming a proxy into the private network.

Off unless ``--allow-url-inputs``; then, for every hop (the URL and each redirect):

1. the scheme is http or https, the URL carries no credentials, the host is on the allowlist;
2. the host is resolved here (`getaddrinfo` on the loop's executor) and *every* address must be
   public: private, loopback, link-local, shared, reserved, multicast and unspecified addresses
   are refused (IPv4-mapped IPv6 included), so a name that resolves to 127.0.0.1 is refused;
3. the connection goes to the address that was checked (no second resolution that DNS
   rebinding could answer differently); https verifies the certificate against the host name.

Each fetch is an HTTP/1.0 GET on asyncio streams (HTTP/1.0: no chunked bodies), bounded in
time (one limit for the whole fetch, redirects included, and never past the call's deadline), in
size (Content-Length checked before reading, the body read at most to the limit) and in number
(a semaphore). Policy refusals raise `Forbidden` (PERMISSION_DENIED); URLs that cannot be
fetched raise `InvalidInput`; a fetch cut short by the request's own limit (its deadline or
queue timeout) raises `DeadlineExpired`. Messages name the host, never the path, query or
credentials.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from clipserve.server.errors import DeadlineExpired, Forbidden, InvalidInput
from clipserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_CONCURRENT_FETCHES = 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADER_LIMIT = 64 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: host, port -> the addresses it resolves to (IP strings).
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class UrlPolicy:
    """What URL inputs may reach (the settings `url_*`)."""

    allowlist: tuple[str, ...]  # lower-case hosts, '*.suffix' patterns or '*'
    max_bytes: int = 16 << 20
    timeout_s: float = 5.0
    allow_private: bool = False  # UNSAFE: tests only

    @classmethod
    def parse(
        cls, allowlist: str, *, max_bytes: int, timeout_s: float, allow_private: bool
    ) -> UrlPolicy:
        hosts = tuple(h.strip().lower().strip("[]") for h in allowlist.split(",") if h.strip())
        return cls(hosts, max_bytes, timeout_s, allow_private)

    def allows_host(self, host: str) -> bool:
        for pattern in self.allowlist:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False


@dataclass(frozen=True)
class Target:
    """One checked hop: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str  # the checked IP the connection goes to
    path: str  # path and query


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def refused_address(address: str) -> str | None:
    """Why `address` may not be reached ('loopback', 'private', ...), or None if it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64.0.0/10) and other special ranges
        return "non-public"
    return None


class UrlFetcher:
    """Fetches image bytes for `Image.url` under a `UrlPolicy`."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self._resolve = resolver
        self._ssl = ssl_context or ssl.create_default_context()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)

    async def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body of `url` (following checked redirects), within the policy's limits."""
        budget, by_deadline = self.policy.timeout_s, False
        if deadline is not None and deadline - time.monotonic() < budget:
            budget, by_deadline = deadline - time.monotonic(), True
        if budget <= 0:
            raise DeadlineExpired(
                "the queue timeout or the call's deadline passed before the URL could be fetched"
            )
        try:
            return await asyncio.wait_for(self._fetch_in_slot(url), budget)
        except TimeoutError:
            if by_deadline:  # the request's own limit, not the image host's slowness
                raise DeadlineExpired(
                    "the queue timeout or the call's deadline passed while fetching the URL"
                ) from None
            raise InvalidInput(
                f"fetching the URL took longer than {budget:.1f}s (url_timeout_s)"
            ) from None

    async def _fetch_in_slot(self, url: str) -> bytes:
        async with self._slots:  # waiting for a slot counts against the time limit too
            return await self._follow(url)

    async def _follow(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            target = await self.check(url)
            status, headers, reader, writer = await self._request(target)
            try:
                if status in _REDIRECTS:
                    location = headers.get("location")
                    if not location:
                        raise InvalidInput(f"{target.host} answered HTTP {status} without Location")
                    url = urljoin(url, location)
                    continue
                if status != 200:
                    raise InvalidInput(f"{target.host} answered HTTP {status}")
                return await self._body(target, headers, reader)
            finally:
                writer.close()
        raise InvalidInput(f"more than {MAX_REDIRECTS} redirects")

    async def check(self, url: str) -> Target:
        """Apply the policy to one hop; resolve and check every address of its host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidInput("the URL cannot be parsed") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise Forbidden(f"URL scheme {scheme or 'none'!r} is not allowed (only http, https)")
        if parts.username is not None or parts.password is not None:
            raise Forbidden("URLs with credentials (user:password@) are refused")
        host = (parts.hostname or "").lower()
        if not host:
            raise InvalidInput("the URL has no host")
        if not self.policy.allows_host(host):
            raise Forbidden(f"host {host!r} is not on the URL allowlist (url_allowlist)")
        port = port or _DEFAULT_PORTS[scheme]
        try:
            addresses = await self._resolve(host, port)
        except (OSError, UnicodeError):
            raise InvalidInput(f"host {host!r} cannot be resolved") from None
        if not addresses:
            raise InvalidInput(f"host {host!r} cannot be resolved")
        if not self.policy.allow_private:
            for address in addresses:
                kind = refused_address(address)
                if kind is not None:
                    article = "an" if kind[0] in "aeiou" else "a"
                    raise Forbidden(
                        f"host {host!r} resolves to {address}, {article} {kind} address; URL "
                        "inputs may only reach public addresses"
                    )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(scheme, host, port, addresses[0], path)

    async def _request(
        self, target: Target
    ) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
        tls = target.scheme == "https"
        try:
            reader, writer = await asyncio.open_connection(
                target.address, target.port, limit=_HEADER_LIMIT,
                ssl=self._ssl if tls else None, server_hostname=target.host if tls else None,
            )
        except ssl.SSLError:
            raise InvalidInput(f"TLS with {target.host} failed (certificate?)") from None
        except OSError:
            raise InvalidInput(f"cannot connect to {target.host} port {target.port}") from None
        try:
            host = target.host if ":" not in target.host else f"[{target.host}]"
            default = _DEFAULT_PORTS[target.scheme] == target.port
            writer.write(
                f"GET {target.path} HTTP/1.0\r\nHost: {host}{'' if default else f':{target.port}'}"
                "\r\nAccept: image/*\r\nUser-Agent: clipserve\r\nConnection: close\r\n\r\n"
                .encode("ascii", "strict")
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except UnicodeEncodeError:
            writer.close()
            raise InvalidInput("the URL path is not ASCII (percent-encode it)") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            raise InvalidInput(f"{target.host} sent no valid HTTP response") from None
        except BaseException:  # cancelled (the fetch's time limit): do not leave it open
            writer.close()
            raise
        try:
            status, headers = _parse_head(head)
        except ValueError:
            writer.close()
            raise InvalidInput(f"{target.host} sent no valid HTTP response") from None
        return status, headers, reader, writer

    async def _body(
        self, target: Target, headers: dict[str, str], reader: asyncio.StreamReader
    ) -> bytes:
        limit = self.policy.max_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidInput(
                f"the image at {target.host} has {int(declared)} bytes, above the limit of "
                f"{limit} (url_max_bytes)"
            )
        body = bytearray()
        while len(body) <= limit:
            try:
                chunk = await reader.read(min(1 << 16, limit + 1 - len(body)))
            except OSError:
                raise InvalidInput(f"{target.host} closed the connection mid-body") from None
            if not chunk:
                break
            body += chunk
        if len(body) > limit:
            raise InvalidInput(
                f"the image at {target.host} has more than {limit} bytes (url_max_bytes)"
            )
        if declared is not None and declared.isdigit() and len(body) != int(declared):
            raise InvalidInput(f"{target.host} sent {len(body)} of {declared} bytes")
        return bytes(body)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/"):
        raise ValueError("not HTTP")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError("bad header line")
            headers[key.strip().lower()] = value.strip()
    return status, headers


def fetcher_for(settings: ServerSettings) -> UrlFetcher | None:
    """The fetcher the settings ask for; None (URL inputs refused) unless allow_url_inputs."""
    if not settings.allow_url_inputs:
        return None
    policy = UrlPolicy.parse(
        settings.url_allowlist, max_bytes=settings.url_max_bytes,
        timeout_s=settings.url_timeout_s, allow_private=settings.url_allow_private,
    )
    if policy.allow_private:
        log.warning("url_allow_private is on: URL inputs may reach private addresses (unsafe)")
    log.info("URL inputs allowed from %s", ", ".join(policy.allowlist))
    return UrlFetcher(policy)

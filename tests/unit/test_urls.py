"""URL input policy (clipserve.server.urls): a fake resolver stands in for DNS; fetches go to
sockets the tests open on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from clipserve.server.errors import DeadlineExpired, Forbidden, InvalidInput
from clipserve.server.urls import UrlFetcher, UrlPolicy, refused_address


def fetcher(answers: dict[str, list[str]], allowlist: str = "*", **policy: object) -> UrlFetcher:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    options = {"max_bytes": 1000, "timeout_s": 1.0, "allow_private": False, **policy}
    made = UrlFetcher(UrlPolicy.parse(allowlist, **options), resolver=resolve)  # type: ignore[arg-type]
    made.resolved = calls  # type: ignore[attr-defined]
    return made


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoints
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("240.0.0.1", "private"),
    ],
)
def test_private_addresses_are_named(address: str, kind: str) -> None:
    assert refused_address(address) == kind


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_pass(address: str) -> None:
    assert refused_address(address) is None


async def test_a_public_name_passes_and_the_checked_address_is_the_one_used() -> None:
    f = fetcher({"images.example.com": ["93.184.215.14"]}, "images.example.com")
    target = await f.check("https://images.example.com/cat.jpg?size=2")
    assert (target.scheme, target.host, target.port) == ("https", "images.example.com", 443)
    assert (target.address, target.path) == ("93.184.215.14", "/cat.jpg?size=2")
    assert f.resolved == ["images.example.com"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "answers", "error", "message"),
    [
        ("http://localhost/a.png", {"localhost": ["127.0.0.1"]}, Forbidden,
         "host 'localhost' resolves to 127.0.0.1, a loopback address; URL inputs may only "
         "reach public addresses"),
        # one private address among public ones is enough (DNS rebinding would pick it)
        ("http://mixed.example/a.png", {"mixed.example": ["93.184.215.14", "10.0.0.7"]},
         Forbidden, "host 'mixed.example' resolves to 10.0.0.7, a private address; URL inputs "
         "may only reach public addresses"),
        ("http://169.254.169.254/latest/meta-data/", {"169.254.169.254": ["169.254.169.254"]},
         Forbidden, "host '169.254.169.254' resolves to 169.254.169.254, a link-local address; "
         "URL inputs may only reach public addresses"),
        ("ftp://example.org/a.png", {}, Forbidden,
         "URL scheme 'ftp' is not allowed (only http, https)"),
        ("file:///etc/passwd", {}, Forbidden,
         "URL scheme 'file' is not allowed (only http, https)"),
        ("gopher://example.org/", {}, Forbidden,
         "URL scheme 'gopher' is not allowed (only http, https)"),
        ("example.org/a.png", {}, Forbidden, "URL scheme 'none' is not allowed (only http, https)"),
        ("http://user:hunter2@example.org/a.png", {}, Forbidden,
         "URLs with credentials (user:password@) are refused"),
        ("http:///a.png", {}, InvalidInput, "the URL has no host"),
        ("http://example.org:99999/a.png", {}, InvalidInput, "the URL cannot be parsed"),
        ("http://nowhere.example/a.png", {}, InvalidInput,
         "host 'nowhere.example' cannot be resolved"),
    ],
)
async def test_refusals(
    url: str, answers: dict[str, list[str]], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        await fetcher(answers).check(url)
    assert str(info.value) == message
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("allowlist", "host", "allowed"),
    [
        ("images.example.com", "images.example.com", True),
        ("images.example.com", "evil.example.com", False),
        ("images.example.com", "images.example.com.evil.net", False),
        ("*.example.com", "cdn.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*", "anything.net", True),
        (" Images.Example.COM , other.org ", "images.example.com", True),
    ],
)
async def test_the_allowlist_is_checked_before_resolving(
    allowlist: str, host: str, allowed: bool
) -> None:
    f = fetcher({host: ["93.184.215.14"]}, allowlist)
    if allowed:
        assert (await f.check(f"http://{host}/x.png")).host == host
    else:
        with pytest.raises(Forbidden, match="is not on the URL allowlist"):
            await f.check(f"http://{host}/x.png")
        assert f.resolved == []  # type: ignore[attr-defined]


async def test_allow_private_is_the_only_way_to_loopback() -> None:
    f = fetcher({"localhost": ["127.0.0.1"]}, "localhost", allow_private=True)
    assert (await f.check("http://localhost:8080/a.png")).address == "127.0.0.1"


async def test_a_slow_host_is_the_inputs_fault_and_a_short_deadline_the_callers() -> None:
    """A host that accepts and never answers: past url_timeout_s the image is refused
    (INVALID_ARGUMENT); when the call's deadline comes first, the deadline passed
    (DEADLINE_EXCEEDED); with no time left, nothing is fetched."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.png"
        f = fetcher({"127.0.0.1": ["127.0.0.1"]}, "127.0.0.1", allow_private=True, timeout_s=0.3)
        with pytest.raises(InvalidInput, match=r"took longer than 0\.3s \(url_timeout_s\)$"):
            await f.fetch(url)
        with pytest.raises(InvalidInput):
            await f.fetch(url, deadline=time.monotonic() + 10)  # url_timeout_s comes first
        patient = fetcher({"127.0.0.1": ["127.0.0.1"]}, "127.0.0.1", allow_private=True,
                          timeout_s=30.0)
        started = time.monotonic()
        with pytest.raises(DeadlineExpired, match=r"deadline passed while fetching the URL$"):
            await patient.fetch(url, deadline=started + 0.1)
        assert time.monotonic() - started < 15  # at the deadline, long before url_timeout_s
        with pytest.raises(DeadlineExpired, match=r"passed before the URL could be fetched$"):
            await patient.fetch(url, deadline=time.monotonic() - 1)


class CannedHost:
    """A TCP server on 127.0.0.1 that answers every request with `reply`, then closes."""

    def __init__(self, reply: bytes) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.1)  # so that the thread sees `close` soon
        self.port = self._sock.getsockname()[1]
        self._reply = reply
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.settimeout(5)
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    conn.sendall(self._reply)
                except OSError:  # the client gave up first
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._sock.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
         "127.0.0.1 sent 10 of 1000 bytes"),
        (b"HTTP/1.0 302 Found\r\nContent-Length: 0\r\n\r\n",
         "127.0.0.1 answered HTTP 302 without Location"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "127.0.0.1 sent no valid HTTP response"),
        (b"HTTP/1.0 200 OK\r\nno colon here\r\n\r\nbody", "127.0.0.1 sent no valid HTTP response"),
        (b"HTTP/1.0 200 OK\r\nContent-Type: image/png", "127.0.0.1 sent no valid HTTP response"),
    ],
    ids=["short-body", "redirect-without-location", "not-http", "header-without-colon",
         "headers-never-end"],
)
async def test_hosts_that_answer_badly_are_named_and_refused(reply: bytes, message: str) -> None:
    host = CannedHost(reply)
    try:
        f = fetcher({"127.0.0.1": ["127.0.0.1"]}, "127.0.0.1", allow_private=True)
        with pytest.raises(InvalidInput) as info:
            await f.fetch(f"http://127.0.0.1:{host.port}/a.png")
        assert str(info.value) == message
    finally:
        host.close()


async def test_a_non_ascii_path_is_refused_before_anything_is_sent() -> None:
    host = CannedHost(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        f = fetcher({"127.0.0.1": ["127.0.0.1"]}, "127.0.0.1", allow_private=True)
        with pytest.raises(InvalidInput, match=r"the URL path is not ASCII \(percent-encode it\)"):
            await f.fetch(f"http://127.0.0.1:{host.port}/k\u00e4tzchen.png")
        assert await f.fetch(f"http://127.0.0.1:{host.port}/k%C3%A4tzchen.png") == b"ok"
    finally:
        host.close()

"""What a client can make the server hold: JSON bodies over the limit are refused before they are read whole, a
connection must send its headers in time, and one IP cannot hold more than its share of connections. A real
orchestrator on uvicorn with server_options, spoken to over raw sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.orchestrator.app import MAX_BODY_BYTES, MAX_HEADER_BYTES, server_options
from iota.orchestrator.guards import guarded_http
from tests.orchestrator import run_settings
from tests.security import MINERS, Net, serve_net

HEADER_TIMEOUT_S = 1.0
PER_IP = 6


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    options = server_options(
        run_settings(data_dir, tmp_path), header_timeout_s=HEADER_TIMEOUT_S, max_connections_per_ip=PER_IP
    )
    with serve_net(data_dir, keypairs, tmp_path, options=options) as net:
        yield net


def connect(net: Net, source: str = "127.0.0.1") -> socket.socket:
    url = urlsplit(net.url)
    sock = socket.create_connection(
        (url.hostname or "", url.port or 80), timeout=5, source_address=(source, 0)
    )
    sock.settimeout(5)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` (EOF or reset) within `seconds`, reading whatever it sends before."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def closed_now(sock: socket.socket) -> bool:
    """True if the server has already closed `sock` (a read would see EOF or a reset right away)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def response_to(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_body_over_the_limit_is_refused_from_its_content_length(net: Net) -> None:
    with connect(net) as sock:
        declared = 64 * MAX_BODY_BYTES
        sock.sendall(f"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode())
        started = time.monotonic()
        reply = response_to(sock)  # answered with no body byte sent: nothing was waited for
        assert reply.startswith(b"HTTP/1.1 413"), reply
        assert time.monotonic() - started < HEADER_TIMEOUT_S
        assert closed_within(sock, 2.0)


def test_a_chunked_body_is_counted_and_cut_at_the_limit(net: Net) -> None:
    chunk = b"x" * 65536
    sent = 0
    with connect(net) as sock:
        sock.sendall(b"POST /miners/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 16 * MAX_BODY_BYTES:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed: what we want
        sock.settimeout(5)
        reply = response_to(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 16 * MAX_BODY_BYTES  # the server did not read all we had to send


def test_bodies_under_the_limit_and_object_uploads_pass(net: Net) -> None:
    response = httpx.post(f"{net.url}/miners/register", content=b"{}" + b" " * (MAX_BODY_BYTES - 2))
    assert response.status_code in (401, 426)  # reached the auth checks, which then refuse an unsigned call
    net.join(*MINERS)
    # Object uploads through presigned URLs are bounded by their signed size, not by the JSON limit.
    key = "runs/run-test/big.bin"
    big = b"\1" * (3 * MAX_BODY_BYTES)
    assert httpx.put(net.store.presign_put(key, 60, len(big)), content=big).status_code == 200
    assert net.store.get(key) == big


def test_headers_must_arrive_in_time(net: Net) -> None:
    with connect(net) as idle, connect(net) as trickle:
        start = time.monotonic()
        for byte in b"POST /work HTTP/1.1\r\nHost: x\r\n":
            try:
                trickle.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - start > 3 * HEADER_TIMEOUT_S:
                break
        assert closed_within(trickle, 2 * HEADER_TIMEOUT_S)
        assert time.monotonic() - start < 3 * HEADER_TIMEOUT_S
        assert closed_within(idle, 0.1)  # said nothing at all: closed as well


def test_a_keep_alive_client_that_pauses_between_requests_is_served(net: Net) -> None:
    with httpx.Client(base_url=net.url) as client:
        assert client.get("/status").status_code == 200
        time.sleep(1.5 * HEADER_TIMEOUT_S)  # idle between requests: uvicorn's keep-alive (5 s) applies
        assert client.get("/status").status_code == 200


def test_one_ip_cannot_take_every_connection(net: Net) -> None:
    with ExitStack() as stack:
        hogs = [stack.enter_context(connect(net, "127.0.0.5")) for _ in range(PER_IP + 4)]
        time.sleep(0.3)  # well within the header deadline: only the cap closes connections
        dropped = [closed_now(sock) for sock in hogs]
        assert dropped.count(False) == PER_IP and all(dropped[PER_IP:]), dropped
        # Other addresses are served while the hog holds its share.
        transport = httpx.HTTPTransport(local_address="127.0.0.6")
        with httpx.Client(base_url=net.url, transport=transport) as client:
            assert client.get("/status").status_code == 200


# -- the same guards on either HTTP parser (httptools where installed, h11 otherwise) ----------------------

PARSER_HEADER_TIMEOUT_S = 2.0  # long enough that a refusal on size is told apart from the deadline


# httptools is a dependency (pyproject.toml): only an install without it skips the httptools cases.
HTTPTOOLS_MISSING = "httptools, uvicorn's C parser, is not installed: pip install httptools"


@pytest.fixture(params=["httptools", "h11"])
def parser_net(
    request: pytest.FixtureRequest, data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> Iterator[Net]:
    with serve_net(
        data_dir, keypairs, tmp_path, options=parser_options(request.param, data_dir, tmp_path)
    ) as net:
        yield net


def parser_options(parser: str, data_dir: Path, tmp_path: Path) -> dict:
    """Server options with the guarded protocol on `parser` (httptools or h11)."""
    if parser == "httptools":
        pytest.importorskip("httptools", reason=HTTPTOOLS_MISSING)
    options = server_options(run_settings(data_dir, tmp_path), max_connections_per_ip=PER_IP)
    options["http"] = guarded_http(PARSER_HEADER_TIMEOUT_S, PER_IP, parser=parser)
    return options


def test_server_options_take_httptools_where_installed(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("httptools", reason=HTTPTOOLS_MISSING)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(server_options(run_settings(data_dir, tmp_path))["http"], HttpToolsProtocol)
    assert not issubclass(guarded_http(1.0, 1, parser="h11"), HttpToolsProtocol)


def test_headers_over_the_limit_are_refused_at_once(parser_net: Net) -> None:
    with connect(parser_net) as sock:
        started = time.monotonic()
        try:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (2 * MAX_HEADER_BYTES))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed
        sock.settimeout(PARSER_HEADER_TIMEOUT_S)
        try:
            reply = response_to(sock)
        except ConnectionResetError:
            reply = b""  # closed with our bytes unread: the answer may be lost to the reset
        assert closed_within(sock, PARSER_HEADER_TIMEOUT_S)
        # Refused for its size, long before the header deadline: not held while it waits for more.
        assert time.monotonic() - started < PARSER_HEADER_TIMEOUT_S / 2
        assert reply == b"" or reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), reply[:200]


def test_deadline_cap_and_keep_alive_on_either_parser(parser_net: Net) -> None:
    with connect(parser_net) as trickle:
        start = time.monotonic()
        for byte in b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                trickle.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - start > 2 * PARSER_HEADER_TIMEOUT_S:
                break
        assert closed_within(trickle, PARSER_HEADER_TIMEOUT_S)
        assert PARSER_HEADER_TIMEOUT_S * 0.9 < time.monotonic() - start < 2 * PARSER_HEADER_TIMEOUT_S
    with ExitStack() as stack:
        hogs = [stack.enter_context(connect(parser_net, "127.0.0.7")) for _ in range(PER_IP + 2)]
        time.sleep(0.3)
        assert [closed_now(sock) for sock in hogs] == [False] * PER_IP + [True] * 2
    with httpx.Client(base_url=parser_net.url) as client:
        # Keep-alive: two requests on one connection, a pause longer than the header deadline between them.
        assert client.get("/status").status_code == 200
        time.sleep(1.2 * PARSER_HEADER_TIMEOUT_S)
        assert client.get("/status").status_code == 200
        body = (
            b"{}" + b" " * 100_000
        )  # a body after the headers is read at the app's pace, not counted as headers
        assert client.post("/miners/register", content=body).status_code in (401, 426)


def test_bytes_after_a_complete_request_do_not_cut_off_its_answer(parser_net: Net) -> None:
    # httptools parses what follows a request while it is being answered; the refusal of those bytes must wait
    # for that answer, as under h11 (which does not parse them until then).
    for tail in (
        b"NOT A REQUEST\r\n\r\n",
        b"GET /status HTTP/1.1\r\nX-Padding: " + b"a" * (2 * MAX_HEADER_BYTES),
    ):
        with connect(parser_net) as sock:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" + tail)
            assert response_to(sock).startswith(b"HTTP/1.1 200")
            assert closed_within(sock, PARSER_HEADER_TIMEOUT_S)


@pytest.fixture(params=["httptools", "h11"])
def small_header_net(
    request: pytest.FixtureRequest, data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> Iterator[Net]:
    """A header bound small enough that a request over it fits in one TCP segment, so it arrives in one read."""
    options = parser_options(request.param, data_dir, tmp_path)
    options["h11_max_incomplete_event_size"] = SMALL_HEADER_BYTES
    with serve_net(data_dir, keypairs, tmp_path, options=options) as net:
        yield net


SMALL_HEADER_BYTES = 8 * 1024


def test_headers_over_the_bound_in_one_write_are_refused(small_header_net: Net) -> None:
    # Complete headers in one read used to pass uncounted: the bound held only for headers still incomplete.
    padding = b"a" * (SMALL_HEADER_BYTES + 4096)
    with connect(small_header_net) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Padding: " + padding + b"\r\n\r\n")
        reply = response_to(sock)
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), reply[:200]
        assert closed_within(sock, PARSER_HEADER_TIMEOUT_S)
    # Headers under the bound, in one write with their body, still pass.
    body = b"{}" + b" " * 100_000
    headers = {"X-Pad": "a" * (SMALL_HEADER_BYTES // 2)}
    response = httpx.post(f"{small_header_net.url}/miners/register", content=body, headers=headers)
    assert response.status_code in (401, 426)


def test_object_transfers_are_not_counted_by_the_per_ip_limit(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    # The limit exempts every path under /storage (presigned transfers, bounded by their signature), not only
    # "/storage" itself, which no transfer uses.
    with serve_net(data_dir, keypairs, tmp_path, rate_per_ip=1.0) as net:
        key = "runs/run-test/object.bin"
        net.store.put(key, b"\1" * 100)
        url = net.store.presign_get(key, 60)
        with httpx.Client() as client:
            assert [client.get(url).status_code for _ in range(10)] == [200] * 10
            statuses = [client.get(f"{net.url}/status").status_code for _ in range(10)]
        assert 429 in statuses  # the API is still counted (a burst of 2, one more a second)

"""bench/links.py and bench/wan.py's arithmetic: the link's schedule, the relay's byte and request counts, the
phase spans. No timing is asserted (the box may be loaded): only what the relay delivers and counts."""

import asyncio

import pytest

from bench import wan
from bench.links import Direction, Link, Relay


def test_a_direction_sends_chunks_one_after_another_at_its_rate() -> None:
    link = Link(rtt_ms=100, mbit=8)  # 1 MB/s, 50 ms one way
    direction = Direction(link)
    first = direction.deliver_at(100_000, now=10.0)  # 0.1 s to send, then 50 ms on the way
    second = direction.deliver_at(100_000, now=10.0)  # queued behind the first
    later = direction.deliver_at(1_000, now=20.0)  # the link is idle again by then
    assert first == pytest.approx(10.15)
    assert second == pytest.approx(10.25)
    assert later == pytest.approx(20.051)


def test_the_relay_passes_bytes_intact_and_counts_each_request_once() -> None:
    async def scenario() -> tuple[bytes, Relay, bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        relay = Relay(Link(rtt_ms=0, mbit=10_000), ("127.0.0.1", target.sockets[0].getsockname()[1]))
        server = await relay.serve("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        body = bytes(range(256)) * 400  # 100 KB: several chunks
        request = b"PUT /storage/objects/a/b?sig=x HTTP/1.1\r\nlength: 102400\r\n\r\n" + body
        request += b"POST /work/12/report HTTP/1.1\r\n\r\n"
        for at in range(0, len(request), 7_000):  # pieces that cut request lines apart
            writer.write(request[at : at + 7_000])
            await writer.drain()
        writer.write_eof()
        echoed = await reader.read()
        writer.close()
        server.close()
        target.close()
        return request, relay, echoed

    request, relay, echoed = asyncio.run(scenario())
    assert echoed == request
    assert relay.bytes_up == relay.bytes_down == len(request)
    assert relay.requests == {"PUT /storage/objects": 1, "POST /work/12/report": 1}


def test_request_lines_straddling_two_reads_are_counted_once() -> None:
    relay = Relay(Link(1, 1), ("127.0.0.1", 1))
    data = b"POST /work HTTP/1.1\r\n\r\n{}GET /storage/objects/k HTTP/1.1\r\n\r\n"
    relay._count_requests(data, already=0)
    tail = data[-600:]
    relay._count_requests(tail + b"PUT /storage/objects/k HTTP/1.1\r\n", already=len(tail))
    assert relay.requests == {"POST /work": 1, "GET /storage/objects": 1, "PUT /storage/objects": 1}


def test_phase_spans_and_the_requests_sent_between_two_times() -> None:
    events = [
        (1.0, {"phase": "train"}),
        (5.0, {"phase": "upload"}),
        (6.0, {"phase": "merge"}),
        (9.0, {"phase": "apply"}),
        (9.5, {"phase": "done"}),
    ]
    assert wan._phase_spans(events) == [("upload", 5.0, 6.0), ("merge", 6.0, 9.0), ("apply", 9.0, 9.5)]
    assert wan._merge_windows(events) == [(5.0, 9.5)]
    lines = [
        {"t": 1.0, "up": 10, "down": 5, "requests": {"POST /work/3/report": 1}},
        {"t": 7.0, "up": 110, "down": 905, "requests": {"POST /work/3/report": 1, "POST /work/4/report": 2}},
    ]
    assert wan._sent([lines], 2.0, 8.0) == {"POST /work/{n}/report": 2}
    assert wan._line_rate_s([lines], 2.0, 8.0, Link(rtt_ms=10, mbit=0.008)) == pytest.approx(900 / 1000)

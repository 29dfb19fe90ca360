"""Thousands of random, mutated, truncated and oversized handshakes against a live proxy.

Every connection must end with an error or a close (never a hang, never a traceback), the proxy
must log no unexpected exception, and a normal login must still work afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import struct
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from argon.proxy.throttle import Throttle
from argon.proxy.tls import TlsConfig, ensure_certificates
from argon.wire import codec
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.scratch_pg import ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = [pytest.mark.pg, pytest.mark.slow]

EP = "ep-fuzz"
CASES = 3000  # all of them run, however long a loaded machine takes (a hang fails in _plain's 10 s)
CONCURRENCY = 48
PASSWORD = "fuzz-pw-1"


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_proxy(scratch_pg: ScratchPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHarness]:  # noqa: F811
    control = FakeControl()
    control.add_endpoint(EP, scratch_pg.socket_path)
    control.set_secret(EP, "fuzzer", scratch_pg.create_role("fuzzer", PASSWORD))
    certs = ensure_certificates(tmp_path_factory.mktemp("tls"), "argon.test")
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key),
                           throttle=Throttle(free_per_ip=10**9, free_per_role=10**9))
    yield harness
    harness.stop()


def _startup(rng: random.Random, *, endpoint: bool = True) -> bytes:
    params = {"user": "fuzzer", "database": "fuzzer"}
    if endpoint:
        params["options"] = f"endpoint={EP}"
    if rng.random() < 0.3:
        params["application_name"] = "x" * rng.randint(0, 300)
    return codec.startup_message(params)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.4 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op < 0.6:
            buf[rng.randint(0, len(buf)):rng.randint(0, len(buf))] = rng.randbytes(rng.randint(0, 16))
        elif op < 0.8 and buf:
            del buf[rng.randint(0, len(buf)):]
        elif len(buf) >= 4:
            buf[0:4] = struct.pack("!I", rng.choice([0, 1, 7, 8, 9, 10000, 10001, 2**31 - 1, 2**32 - 1,
                                                     rng.randrange(2**32)]))
    return bytes(buf)


def _message(rng: random.Random, msg_type: bytes = b"p") -> bytes:
    payload = rng.randbytes(rng.choice([0, 1, 5, 30, 200, 511, 512, 600, 5000]))
    length = len(payload) + 4 if rng.random() < 0.7 else rng.randrange(2**32)
    return msg_type + struct.pack("!I", length) + payload


def _sasl_initial(rng: random.Random) -> bytes:
    mech = rng.choice([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"MD5", rng.randbytes(8), b""])
    data = rng.choice([b"n,,n=,r=abc", b"y,,n=,r=abc", b"p=tls-server-end-point,,n=,r=x", b"n,,",
                       rng.randbytes(rng.randint(0, 100)), b"n,,n=fuzzer,r=" + rng.randbytes(20)])
    declared = len(data) if rng.random() < 0.8 else rng.choice([-1, 0, len(data) + 5, 2**31 - 1])
    body = mech + b"\0" + struct.pack("!i", declared) + data
    return b"p" + struct.pack("!I", len(body) + 4) + body


def _cases(rng: random.Random) -> Iterator[tuple[bytes, bool]]:
    """(bytes to send, whether to wrap them in TLS first)."""
    makers: list[Callable[[], tuple[bytes, bool]]] = [
        lambda: (rng.randbytes(rng.randint(0, 64)), False),
        lambda: (rng.randbytes(rng.randint(64, 12000)), False),
        lambda: (_mutate(rng, _startup(rng)), False),
        lambda: (_mutate(rng, _startup(rng)), True),
        lambda: (struct.pack("!II", 8 + 4, rng.randrange(2**32)) + rng.randbytes(4), False),
        lambda: (struct.pack("!IHH", 8, 3, rng.randint(0, 9)) if rng.random() < 0.5
                 else struct.pack("!IHH", 200, rng.randint(0, 9), rng.randint(0, 9)) + rng.randbytes(192), False),
        lambda: (codec.ssl_request() + rng.randbytes(rng.randint(0, 300)), False),
        lambda: (codec.ssl_request() + codec.ssl_request(), False),
        lambda: (struct.pack("!II", 8, codec.GSSENC_REQUEST_CODE) * rng.randint(1, 3) + _startup(rng), False),
        lambda: (b"\x16\x03\x01" + rng.randbytes(rng.randint(0, 400)), False),
        lambda: (struct.pack("!II", rng.choice([16, 20, 12]), codec.CANCEL_REQUEST_CODE) + rng.randbytes(12), False),
        lambda: (struct.pack("!I", rng.randint(10001, 2**31)) + rng.randbytes(100), False),
        lambda: (_startup(rng) + _message(rng, rng.choice([b"p", b"Q", b"X", rng.randbytes(1)])), False),
        lambda: (_startup(rng) + _sasl_initial(rng), False),
        lambda: (_startup(rng) + _sasl_initial(rng), True),
        lambda: (_startup(rng, endpoint=False) + _message(rng), False),
        lambda: (_startup(rng, endpoint=False) + b"p" + struct.pack("!I", 20) + b"endpoint=ep-fuzz;x", False),
        lambda: (codec.startup_message({"user": "fuzzer", rng.randbytes(5).hex(): "\u00e9\u00e8" * 10})
                 + _sasl_initial(rng), False),
    ]
    for _ in range(CASES):
        yield rng.choice(makers)()


def _check_reply(reply: bytes, sent: bytes) -> None:
    pos = 0
    if reply[:1] in (b"N", b"S") and (sent[4:8] in (struct.pack("!I", codec.SSL_REQUEST_CODE),
                                                  struct.pack("!I", codec.GSSENC_REQUEST_CODE))):
        pos = 1
        if reply[:2] == b"NN":
            pos = 2
    while pos < len(reply):
        assert reply[pos:pos + 1] in (b"E", b"R", b"v", b"N", b"S"), (reply[pos:pos + 20], sent[:40])
        if reply[pos:pos + 1] == b"S" and len(reply) - pos == 1:
            return  # 'S' to a second SSLRequest never happens, but a TLS reply we did not read could
        length = struct.unpack_from("!I", reply, pos + 1)[0]
        body = reply[pos + 5:pos + 1 + length]
        if reply[pos:pos + 1] == b"E":
            assert b"CXX000\0" in body and b"Traceback" not in body, body
        pos += 1 + length


async def _plain(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), 10)
    except OSError:  # reset, broken pipe, or ENOTCONN from write_eof: the proxy already closed
        return b""
    finally:
        writer.close()


async def _tls(port: int, data: bytes, ctx: ssl.SSLContext) -> bytes:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(-1), 0.5)
        except TimeoutError:
            return b""  # the proxy waits for the rest of a truncated packet; our close ends it
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()


def test_fuzzed_handshakes(fuzz_proxy: ProxyHarness) -> None:
    errors = _Errors()
    logging.getLogger("argon.proxy").addHandler(errors)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    rng = random.Random(20240611)
    results: list[tuple[bytes, bytes]] = []

    async def run() -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(data: bytes, tls: bool) -> None:
            async with limit:
                reply = await (_tls(fuzz_proxy.port, data, ctx) if tls else _plain(fuzz_proxy.port, data))
                results.append((data, reply))

        await asyncio.gather(*(one(data, tls) for data, tls in _cases(rng)))

    try:
        asyncio.run(run())
    finally:
        logging.getLogger("argon.proxy").removeHandler(errors)
    assert len(results) == CASES, f"only {len(results)} of {CASES} cases ran"
    for sent, reply in results:
        _check_reply(reply, sent)
    assert not errors.records, [r.getMessage() for r in errors.records[:5]]
    deadline = time.monotonic() + 20
    while fuzz_proxy.sessions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fuzz_proxy.sessions() == 0
    with psycopg.connect(host="127.0.0.1", port=fuzz_proxy.port, user="fuzzer", password=PASSWORD,
                         dbname="fuzzer", sslmode="require", options=f"endpoint={EP}") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


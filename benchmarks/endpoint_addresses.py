"""What endpoints' own loopback addresses cost the proxy (ADR 0031), at 1,000 endpoints.

Run from the repository root:

    .venv/bin/python -m benchmarks.endpoint_addresses [--endpoints N] [--rounds N] [--json PATH]

One proxy (`argon.proxy.server.ProxyServer`, TLS with a generated certificate, the test suite's
`FakeControl` behind it: nothing is authenticated here) on 127.0.0.1 and a free port, in this
process. Then:

1. listeners: `serve_addresses` for N endpoints (two addresses each, direct and pooled, as the
   platform gives them): the time to bind them all, the descriptors and the resident memory they
   add, and the time to close them all again;
2. accept and route: a TCP connect plus an SSLRequest answered with `S`, on the proxy's own address
   and on endpoint addresses (the first, the middle and the last one bound), interleaved, with
   all N endpoints' listeners open — the accept path looks the local address up in a dict, so the
   two should not differ beyond noise.

Prints a readable table, then the JSON. Everything started here is stopped in `finally` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fixtures.fake_control import FakeControl

from argon.control.addresses import address_of, listen_map
from argon.platform import raise_fd_limit
from argon.proxy.activity import ActivityRegistry
from argon.proxy.server import ProxyServer
from argon.proxy.tls import TlsConfig, ensure_certificates

SSL_REQUEST = struct.pack("!II", 8, 80877103)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ssl_request(host: str, port: int) -> float:
    """Seconds for connect + SSLRequest + the proxy's one-byte answer."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST)
        if sock.recv(1) != b"S":
            raise RuntimeError(f"{host}:{port} did not answer S to an SSLRequest")
    return time.perf_counter() - start


async def run(endpoints: int, rounds: int) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="argon-bench-") as tmp:
        files = ensure_certificates(Path(tmp), "argon.localhost")
        proxy = ProxyServer(host="127.0.0.1", port=0, control=FakeControl(),  # type: ignore[arg-type]
                            activity=ActivityRegistry(), tls=TlsConfig(files.cert, files.key),
                            server_secret=os.urandom(32), internal_socket=False)
        await proxy.start()
        try:
            fds0, rss0 = open_fds(), rss_kib()
            t0 = time.perf_counter()
            for slot in range(endpoints):
                proxy.serve_addresses(f"ep-bench-{slot}", listen_map(f"ep-bench-{slot}", address_of(slot)))
            await asyncio.sleep(0)  # the accept tasks start
            bind_s = time.perf_counter() - t0
            fds1, rss1 = open_fds(), rss_kib()
            targets = {"proxy 127.0.0.1": "127.0.0.1", "first endpoint": address_of(0),
                       "middle endpoint": address_of(endpoints // 2), "last endpoint": address_of(endpoints - 1)}
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(rounds):
                for name, host in targets.items():
                    samples[name].append(await asyncio.to_thread(ssl_request, host, proxy.port))
            t0 = time.perf_counter()
            for slot in range(endpoints):
                proxy.serve_addresses(f"ep-bench-{slot}", None)
            await asyncio.sleep(0.1)  # the accept tasks end and close their sockets
            close_s = time.perf_counter() - t0
            fds2 = open_fds()
        finally:
            await proxy.stop()
    return {
        "endpoints": endpoints, "listeners": 2 * endpoints, "rounds": rounds,
        "bind_ms": bind_s * 1000, "close_ms": close_s * 1000,
        "fds_added": fds1 - fds0, "fds_left_after_close": fds2 - fds0,
        "rss_added_kib": rss1 - rss0, "rss_per_endpoint_kib": (rss1 - rss0) / endpoints,
        "fd_soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "ssl_request_ms": {name: {"median": statistics.median(v) * 1000, "p90": sorted(v)[int(len(v) * 0.9)] * 1000}
                           for name, v in samples.items()},
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = asyncio.run(run(args.endpoints, args.rounds))
    base = out["ssl_request_ms"]["proxy 127.0.0.1"]["median"]
    print(f"{out['endpoints']} endpoints, {out['listeners']} listeners (load average "
          f"{', '.join(f'{x:.1f}' for x in out['load_average'])})", file=sys.stderr)
    print(f"  bind all      {out['bind_ms']:8.1f} ms   close all {out['close_ms']:8.1f} ms", file=sys.stderr)
    print(f"  descriptors   +{out['fds_added']} (left after close: {out['fds_left_after_close']}; soft limit "
          f"{out['fd_soft_limit']})", file=sys.stderr)
    print(f"  memory        +{out['rss_added_kib']} KiB ({out['rss_per_endpoint_kib']:.1f} KiB per endpoint)",
          file=sys.stderr)
    for name, v in out["ssl_request_ms"].items():
        print(f"  {name:18s} connect+SSLRequest median {v['median']:.3f} ms, p90 {v['p90']:.3f} ms "
              f"(x{v['median'] / base:.2f} of the proxy's own address)", file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()

"""The platform role's session for a Postgres client tool that runs as a compute's uid.

`pg_dump`, `pg_dumpall` and `psql` read what a tenant controls (its catalog, a dump of it), and
psql runs any meta-command a dump carries (`\\! cmd`): as root that would be a root shell for
whoever controls the compute. So they run as the compute's uid, with a clean environment. That
uid has no passwd entry, so Postgres' peer authentication cannot map it to the platform role;
instead the tool connects to this relay, which listens in a private directory of the run dir,
accepts only that uid (`SO_PEERCRED`), opens Argon's own peer-authenticated session to the compute
for the database the tool asked for (with the same server check as `argon.compute.admin`) and
then only copies bytes both ways. The tool gets no more than its uid has anyway (it owns the
cluster's files); root sends it no credential and runs none of its input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from argon import safefs
from argon.compute.admin import SESSION_OPTIONS, check_server, peer_uid
from argon.compute.osuser import OsUser
from argon.model import PLATFORM_ROLE
from argon.wire import codec

log = logging.getLogger(__name__)

SOCKET_NAME = ".s.PGSQL.5432"
_HANDSHAKE_TIMEOUT = 20.0


class _Relay:
    def __init__(self, compute_socket_dir: Path, directory: Path, user: OsUser) -> None:
        self.compute = compute_socket_dir
        self.directory = directory
        self.user = user
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.threads: list[threading.Thread] = []
        self.closing = False

    def start(self) -> None:
        path = self.directory / SOCKET_NAME  # the directory is still root's alone: nothing swaps this
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        os.chown(path, self.user.uid, self.user.gid, follow_symlinks=False)
        self.listener.listen(8)
        thread = threading.Thread(target=self._accept, name="argon-tool-relay", daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self.threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="argon-tool-session", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, client: socket.socket) -> None:
        server: socket.socket | None = None
        try:
            if peer_uid(client.fileno()) != self.user.uid:
                return
            client.settimeout(_HANDSHAKE_TIMEOUT)
            startup = _read_startup(client)
            if startup is None:
                return
            version, params = startup
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.settimeout(_HANDSHAKE_TIMEOUT)
            server.connect(str(self.compute / SOCKET_NAME))
            check_server(server.fileno(), self.compute)
            ours = {"user": PLATFORM_ROLE, "database": params.get("database") or PLATFORM_ROLE,
                    "application_name": "argon-tool", "options": SESSION_OPTIONS}
            body = struct.pack("!I", version) + b"".join(
                k.encode() + b"\0" + v.encode() + b"\0" for k, v in ours.items()) + b"\0"
            server.sendall(struct.pack("!I", len(body) + 4) + body)
            client.settimeout(None)
            server.settimeout(None)
            _pipe(client, server)
        except (OSError, codec.ProtocolViolation) as exc:
            log.debug("tool relay session ended: %s", exc)
        finally:
            client.close()
            if server is not None:
                server.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the tool closed its connection during start-up")
        data += chunk
    return data


def _read_startup(client: socket.socket) -> tuple[int, dict[str, str]] | None:
    """(protocol version code, parameters) of the tool's StartupMessage; None for a cancel request.
    SSL and GSS requests are declined (a Unix socket)."""
    for _ in range(3):
        header = _recv_exact(client, 4)
        body = _recv_exact(client, codec.startup_packet_length(header) - 4)
        packet = codec.parse_startup_packet(body)
        if isinstance(packet, codec.SSLRequest | codec.GSSENCRequest):
            client.sendall(b"N")
            continue
        if isinstance(packet, codec.StartupMessage):
            return struct.unpack_from("!I", body)[0], packet.params
        return None
    return None


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    try:
        while True:
            for key, _ in sel.select():
                src = key.fileobj
                assert isinstance(src, socket.socket)
                data = src.recv(65536)
                if not data:
                    return
                key.data.sendall(data)
    finally:
        sel.close()


@contextlib.contextmanager
def tool_socket(compute_socket_dir: Path, run_dir: Path, user: OsUser | None) -> Iterator[Path]:
    """The socket directory a client tool should use to reach the compute at `compute_socket_dir`
    as the platform role: a relay for `user` (as root), else the compute's own directory (then the
    tool runs as ourselves and peer authentication maps us)."""
    if user is None or os.geteuid() != 0:
        yield compute_socket_dir
        return
    directory = run_dir / f"tr-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o700)
    try:
        relay = _Relay(compute_socket_dir, directory, user)
        relay.start()
        os.chown(directory, user.uid, user.gid)  # only now may the uid enter
        try:
            yield directory
        finally:
            relay.close()
    finally:
        safefs.rmtree(directory)

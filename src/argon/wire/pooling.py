"""The transaction pooler's behaviour as a pure state machine (ADR 0017): bytes in, bytes out.

`PoolCore` owns pools of server connections per (compute, database, role), the clients that use
them and the protocol state of both. The I/O layer (the asyncio engine, `argon.proxy.pooler.engine`)
feeds it what each socket read (`client_data`, `server_data`), tells it about ends and new server
connections, and implements the hooks it calls back (`send_client`, `send_server`, `close_client`,
`close_server`, `want_server`, `client_reading`). Nothing here touches a socket, a loop or a clock
(`now` is a hook). The C engine (`argon/proxy/_pooler.c`) is a port of this module; the unit
tests drive this one message by message, and the same scenarios run against the C engine.

Rules, after PgBouncer >= 1.21 in transaction mode:

- Framing both ways. Client messages the pooler must read whole (Parse, Bind's names, Describe,
  Close, small Query texts) are buffered; everything else streams. Server DataRow, CopyData and
  FunctionCallResponse stream; other server messages are read whole.
- A client gets a server connection when it sends something that needs one; a waiting client is
  not read further. A server returns to the pool when it says ReadyForQuery with status `I`,
  nothing sent is still unanswered and no COPY is streaming in.
- Per server, a queue of requests sent and what to do with each response: FORWARD it, SKIP it (a
  request the pooler added: a Parse before a Bind, an LRU eviction's Close, the SET of the
  client's tracked parameters, a DISCARD ALL), or FAKE it (a request the pooler answers itself:
  a Parse the server already holds, a Close of a client's name). After an ErrorResponse, Postgres
  skips to the next Sync, and so does the queue.
- Prepared statements: a registry of distinct (pool, query, parameter types) with server names
  `argon_<n>`, a budget per pool and one for all; per client its names; per server an LRU of at most `max_prepared` statements.
- A transaction whose statements may leave session state (`sql_scan.changes_session`) marks its
  server, which runs DISCARD ALL before it serves anyone again.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from argon.wire import codec
from argon.wire.pool_params import query, set_query
from argon.wire.sql_scan import changes_session

FORWARD, SKIP, FAKE = 0, 1, 2
SETVARS, RESET = 1, 2  # kinds of the pooler's own (SKIP) queries

# Server connection states
ACTIVE, IDLE, RESETTING, HELD, CLOSED = "active", "idle", "resetting", "held", "closed"

MAX_MESSAGE = (1 << 30) - 1  # Postgres' own limit on a message
INSPECT_LIMIT = 1 << 20  # a message the pooler must read whole (named Parse, Describe, Close, Bind's names)
SCAN_LIMIT = 256 << 10  # a query text longer than this is not scanned: its server is reset after
SERVER_BUFFER_LIMIT = 16 << 20  # a server message read whole (not DataRow/CopyData/FunctionCallResponse)
MAX_PREPARED = 1000  # per server connection (Neon's max_prepared_statements)
MAX_CLIENT_STATEMENTS = 10_000  # named statements one client may hold
REGISTRY_BUDGET = 256 << 20  # bytes of distinct statement texts, all pools together
POOL_STATEMENT_BUDGET = 32 << 20  # of which one pool may hold: one tenant cannot spend the others' share
WAIT_TIMEOUT = 120.0  # query_wait_timeout (Neon's PgBouncer)
IDLE_TIMEOUT = 600.0  # server_idle_timeout (PgBouncer's default)
STATEMENT_PREFIX = b"argon_"

PARSE_COMPLETE = b"1\0\0\0\x04"
CLOSE_COMPLETE = b"3\0\0\0\x04"
READY_IDLE = b"Z\0\0\0\x05I"
DISCARD_ALL = query("DISCARD ALL")
_FAKES = {ord("P"): PARSE_COMPLETE, ord("C"): CLOSE_COMPLETE}

_u32 = struct.Struct("!I")
_i16 = struct.Struct("!h")

# How a client message is read: whole (BUFFER), only its header before streaming (STREAM), or
# whole when small and streamed otherwise (SQL: Query and Parse texts are scanned when small).
BUFFER, STREAM, SQL, BIND = 0, 1, 2, 3
_CLIENT_READ = {
    ord("Q"): SQL, ord("P"): SQL, ord("B"): BIND, ord("D"): BUFFER, ord("C"): BUFFER, ord("E"): BUFFER,
    ord("S"): BUFFER, ord("H"): BUFFER, ord("X"): BUFFER, ord("c"): BUFFER, ord("f"): BUFFER,
    ord("d"): STREAM, ord("F"): STREAM,
}
_SERVER_STREAMED = frozenset(b"DdV")
_Q, _P, _B, _D, _C, _E, _S, _F, _H, _X = (ord(c) for c in "QPBDCESFHX")
_COPY_DATA, _COPY_DONE, _COPY_FAIL = ord("d"), ord("c"), ord("f")
_READY, _PARAM, _ERROR, _COMPLETE = ord("Z"), ord("S"), ord("E"), ord("C")
_PARSE_OK, _BIND_OK, _CLOSE_OK = ord("1"), ord("2"), ord("3")
_NO_DATA, _ROW_DESC, _EMPTY, _SUSPENDED = ord("n"), ord("T"), ord("I"), ord("s")
_COPY_IN, _COPY_BOTH = ord("G"), ord("W")
_IDLE_STATUS = ord("I")
_CLEARS_STATEMENTS = (b"DEALLOCATE ALL", b"DISCARD ALL")


class Statement:
    """One distinct (query, parameter types): `key` is a Parse message's body after its name."""

    __slots__ = ("id", "key", "name", "pool", "refs", "stateful")

    def __init__(self, id_: int, key: bytes, pool: Pool) -> None:
        self.id = id_
        self.key = key
        self.pool = pool  # whose budget it is charged to
        self.name = STATEMENT_PREFIX + str(id_).encode()
        self.refs = 0
        self.stateful = changes_session(key.split(b"\0", 1)[0][:SCAN_LIMIT]) if len(key) <= SCAN_LIMIT else True

    def parse_message(self) -> bytes:
        return codec.frame(b"P", self.name + b"\0" + self.key)


class Registry:
    """Statements by (pool, key), counted by their users (client names, server LRUs, requests in
    flight). Pools share none (their servers are disjoint); each pool's texts count against its own
    budget as well as the registry's."""

    def __init__(self, budget: int = REGISTRY_BUDGET, pool_budget: int = POOL_STATEMENT_BUDGET) -> None:
        self.budget = budget
        self.pool_budget = pool_budget
        self.bytes = 0
        self._by_key: dict[tuple[int, bytes], Statement] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def acquire(self, pool: Pool, key: bytes) -> Statement | None:
        """The statement of `pool` for `key` with one more reference; None when a budget is spent."""
        stmt = self._by_key.get((pool.id, key))
        if stmt is None:
            if self.bytes + len(key) > self.budget or pool.statement_bytes + len(key) > self.pool_budget:
                return None
            self._next += 1
            stmt = Statement(self._next, key, pool)
            self._by_key[(pool.id, key)] = stmt
            self.bytes += len(key)
            pool.statement_bytes += len(key)
        stmt.refs += 1
        return stmt

    def retain(self, stmt: Statement) -> None:
        stmt.refs += 1

    def release(self, stmt: Statement) -> None:
        stmt.refs -= 1
        if stmt.refs == 0:
            del self._by_key[(stmt.pool.id, stmt.key)]
            self.bytes -= len(stmt.key)
            stmt.pool.statement_bytes -= len(stmt.key)


class Request:
    """A request sent to a server (or answered by the pooler), in order."""

    __slots__ = ("action", "error", "kind", "names", "stmt", "tag")

    def __init__(self, tag: int, action: int, stmt: Statement | None = None, kind: int = 0) -> None:
        self.tag = tag
        self.action = action
        self.stmt = stmt  # a Parse: the statement it registers; an eviction Close: the one it closes
        self.kind = kind  # the pooler's own queries: SETVARS or RESET
        self.names: tuple[int, ...] = ()  # SETVARS: the tracked parameters it sets
        self.error: str | None = None  # the pooler's own query failed with this text


class Pool:
    __slots__ = (
        "clients",
        "id",
        "idle",
        "last_activity",
        "opening",
        "paused",
        "query_count",
        "servers",
        "size",
        "statement_bytes",
        "wait_count",
        "wait_time",
        "waiting",
        "xact_count",
    )

    def __init__(self, pool_id: int, size: int) -> None:
        self.id = pool_id
        self.size = size
        self.idle: list[Server] = []  # LIFO: the most recently used server first
        self.servers: set[Server] = set()
        self.waiting: deque[Client] = deque()
        self.clients: set[Client] = set()
        self.opening = 0  # server connections asked for and not yet added or failed
        self.paused = False
        self.statement_bytes = 0  # the texts of its statements in the registry
        self.last_activity = 0.0
        self.xact_count = 0
        self.query_count = 0
        self.wait_time = 0.0
        self.wait_count = 0


class Client:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "copy_in",
        "id",
        "inbuf",
        "params",
        "pool",
        "prepared",
        "server",
        "stream",
        "terminating",
        "waiting_since",
    )

    def __init__(self, client_id: int, pool: Pool, params: dict[int, str]) -> None:
        self.id = client_id
        self.pool = pool
        self.server: Server | None = None
        self.inbuf = bytearray()
        self.stream = 0  # body bytes of the current message still to pass through
        self.prepared: dict[bytes, Statement] = {}
        self.params = params  # tracked parameter index -> value
        self.copy_in = False  # the server asked for COPY data and the client has not ended it
        self.waiting_since: float | None = None
        self.closed = False
        self.terminating = False  # sent Terminate while answers were still due: closed once they are out
        self.bytes_in = 0
        self.bytes_out = 0


class Server:
    __slots__ = (
        "client",
        "copy_mode",
        "dirty",
        "holds",
        "id",
        "idle_since",
        "inbuf",
        "params",
        "pool",
        "prepared",
        "query_failed",
        "queue",
        "state",
        "status",
        "stream",
        "stream_to_client",
    )

    def __init__(self, server_id: int, pool: Pool, params: dict[int, str]) -> None:
        self.id = server_id
        self.pool = pool
        self.client: Client | None = None
        self.queue: deque[Request] = deque()
        self.prepared: OrderedDict[int, Statement] = OrderedDict()  # LRU: least recently used first
        self.params = params
        self.status = _IDLE_STATUS
        self.copy_mode = False
        self.query_failed = False
        self.dirty = False  # a statement may have left session state: DISCARD ALL before reuse
        self.state = IDLE
        self.holds = 0  # cancels on their way to this server: it serves nobody else meanwhile
        self.inbuf = bytearray()
        self.stream = 0
        self.stream_to_client = False
        self.idle_since = 0.0


@dataclass(frozen=True)
class PoolStats:
    """One pool, as PgBouncer's SHOW POOLS and SHOW STATS put it."""

    cl_active: int
    cl_waiting: int
    cl_idle: int
    sv_active: int
    sv_idle: int
    sv_used: int  # resetting, or held for a cancel
    sv_login: int  # being opened
    maxwait: float  # seconds the longest-waiting client has waited
    size: int
    paused: bool
    xact_count: int
    query_count: int
    wait_time: float  # seconds, all waits together
    wait_count: int
    last_activity: float


def _since(client: Client, now: float) -> float:
    return now if client.waiting_since is None else client.waiting_since


class PoolCore:
    """The pooler's state; subclass and implement the hooks (see the module docstring)."""

    def __init__(self, *, max_prepared: int = MAX_PREPARED, wait_timeout: float = WAIT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, statement_budget: int = POOL_STATEMENT_BUDGET) -> None:
        self.max_prepared = max_prepared
        self.wait_timeout = wait_timeout
        self.idle_timeout = idle_timeout
        self.registry = Registry(pool_budget=statement_budget)
        self.pools: dict[int, Pool] = {}

    # Hooks -------------------------------------------------------------------------------------

    def send_client(self, client: Client, data: bytes) -> None:
        raise NotImplementedError

    def send_server(self, server: Server, data: bytes) -> None:
        raise NotImplementedError

    def close_client(self, client: Client, error: bytes | None) -> None:
        """End a client connection, after what was sent to it (and `error`, an ErrorResponse)."""
        raise NotImplementedError

    def close_server(self, server: Server) -> None:
        raise NotImplementedError

    def want_server(self, pool: Pool) -> None:
        """Open one more server connection for `pool`; answer with add_server or server_failed."""
        raise NotImplementedError

    def client_reading(self, client: Client, on: bool) -> None:
        """Stop (a waiting client) or resume reading a client."""

    def now(self) -> float:
        raise NotImplementedError

    # Pools, clients and servers ------------------------------------------------------------------

    def add_pool(self, pool_id: int, size: int) -> Pool:
        pool = Pool(pool_id, max(1, size))
        self.pools[pool_id] = pool
        return pool

    def resize(self, pool: Pool, size: int) -> None:
        pool.size = max(1, size)
        self._want(pool)

    def drop_pool(self, pool: Pool) -> None:
        """Close a pool's servers and clients and forget it."""
        for client in list(pool.clients):
            self._fail_client(client, None)
        for server in list(pool.servers):
            self._close_server(server)
        self.pools.pop(pool.id, None)

    def add_client(self, pool: Pool, client_id: int, params: dict[int, str], pending: bytes = b"") -> Client:
        client = Client(client_id, pool, params)
        pool.clients.add(client)
        if pending:
            self.client_data(client, pending)
        return client

    def add_server(self, pool: Pool, server_id: int, params: dict[int, str], *, requested: bool = True) -> Server:
        if requested and pool.opening > 0:
            pool.opening -= 1
        server = Server(server_id, pool, params)
        pool.servers.add(server)
        self._idle(server)
        return server

    def server_failed(self, pool: Pool, error: bytes | None) -> None:
        """An asked-for server connection could not be opened. With `error` (an ErrorResponse) and no
        server left in the pool, the waiting clients get it and are closed (PgBouncer's
        kill_pool_logins); otherwise they keep waiting for a server to come free."""
        if pool.opening > 0:
            pool.opening -= 1
        if error is not None and not pool.servers and not pool.opening:
            for client in list(pool.waiting):
                self._fail_client(client, error)

    # Bytes in ------------------------------------------------------------------------------------

    def client_data(self, client: Client, data: bytes) -> None:
        if client.closed:
            return
        client.bytes_in += len(data)
        client.pool.last_activity = self.now()
        client.inbuf += data
        self._run_client(client)

    def server_data(self, server: Server, data: bytes) -> None:
        if server.state == CLOSED:
            return
        server.pool.last_activity = self.now()
        server.inbuf += data
        self._run_server(server)

    def client_lost(self, client: Client) -> None:
        """The client went away (EOF, error, Terminate): a server it holds is closed (its
        transaction, if any, rolls back), as PgBouncer does."""
        if client.closed:
            return
        client.closed = True
        pool = client.pool
        pool.clients.discard(client)
        if client.waiting_since is not None:
            pool.waiting.remove(client)
            client.waiting_since = None
        server = client.server
        if server is not None:
            client.server = server.client = None
            self._close_server(server)
        for stmt in client.prepared.values():
            self.registry.release(stmt)
        client.prepared.clear()

    def server_lost(self, server: Server) -> None:
        """A server connection ended (the compute stopped or crashed, or it sent a FATAL). Its
        client, if it had one, is closed: its transaction is gone."""
        if server.state == CLOSED:
            return
        client = server.client
        self._drop_server(server)
        if client is not None:
            client.server = None
            self._fail_client(client, None)
        self._want(server.pool)

    # Cancels, quiescing, time --------------------------------------------------------------------

    def cancel_target(self, client: Client) -> Server | None:
        """The server a client's cancel must reach, held (serving nobody else) until `unhold`."""
        server = client.server
        if server is None or server.state == CLOSED:
            return None
        server.holds += 1
        return server

    def unhold(self, server: Server) -> None:
        server.holds -= 1
        if server.holds == 0 and server.state == HELD:
            self._idle(server)

    def pause(self, pool: Pool, *, force: bool = False) -> bool:
        """Quiesce a pool before its compute stops: True (and nothing changed) if a server is in use
        or being opened; else no server is handed out any more and the idle ones are closed. With
        `force` (a stop that happens anyway) it pauses and closes the idle ones in any case, and
        says whether a server was in use (those end with the compute)."""
        busy = bool(pool.opening or any(s.state != IDLE for s in pool.servers))
        if busy and not force:
            return True
        pool.paused = True
        for server in list(pool.idle):
            self._close_server(server)
        return busy

    def resume(self, pool: Pool) -> None:
        pool.paused = False
        self._assign(pool)
        self._want(pool)

    def tick(self) -> None:
        """Timeouts: a client waiting longer than `wait_timeout` is closed with PgBouncer's
        `query_wait_timeout`; a server idle longer than `idle_timeout` is closed."""
        now = self.now()
        for pool in list(self.pools.values()):
            while pool.waiting and now - _since(pool.waiting[0], now) > self.wait_timeout:
                self._fail_client(pool.waiting[0], codec.error_response("query_wait_timeout", "08P01", "FATAL"))
            for server in [s for s in pool.idle if now - s.idle_since > self.idle_timeout]:
                self._close_server(server)

    def stats(self, pool: Pool) -> PoolStats:
        now = self.now()
        active = sum(1 for c in pool.clients if c.server is not None)
        states = [s.state for s in pool.servers]
        oldest = pool.waiting[0].waiting_since if pool.waiting else None
        return PoolStats(
            cl_active=active, cl_waiting=len(pool.waiting), cl_idle=len(pool.clients) - active - len(pool.waiting),
            sv_active=states.count(ACTIVE), sv_idle=states.count(IDLE),
            sv_used=states.count(RESETTING) + states.count(HELD), sv_login=pool.opening,
            maxwait=now - oldest if oldest is not None else 0.0, size=pool.size, paused=pool.paused,
            xact_count=pool.xact_count, query_count=pool.query_count, wait_time=pool.wait_time,
            wait_count=pool.wait_count, last_activity=pool.last_activity)

    # Clients -------------------------------------------------------------------------------------

    def _run_client(self, client: Client) -> None:
        buf = client.inbuf
        pos = 0
        try:
            while not client.closed:
                avail = len(buf) - pos
                if client.stream:
                    if not avail:
                        break
                    n = min(avail, client.stream)
                    if client.server is not None:  # else: late COPY data, dropped
                        self.send_server(client.server, bytes(buf[pos:pos + n]))
                    pos += n
                    client.stream -= n
                    continue
                if avail < 5:
                    break
                tag = buf[pos]
                length = _u32.unpack_from(buf, pos + 1)[0]
                how = _CLIENT_READ.get(tag)
                if how is None or length < 4 or length > MAX_MESSAGE:
                    self._fail_client(client, codec.error_response(
                        "invalid frontend message type" if how is None else "invalid message length", "08P01", "FATAL"))
                    return
                total = 1 + length
                whole = avail >= total
                if not whole and (how == BUFFER or (how == SQL and total <= SCAN_LIMIT)):
                    if total > INSPECT_LIMIT:
                        self._fail_client(client, codec.error_response("message too long for the pooler", "08P01",
                                                                       "FATAL"))
                        return
                    break
                if tag == _X:
                    if client.server is not None and client.server.queue:  # answers first, as Postgres does
                        client.terminating = True
                        pos += total
                        self.client_reading(client, False)
                        break
                    self._fail_client(client, None)
                    return
                if tag in (_C, _D) and (total < 7 or buf[pos + total - 1] != 0):
                    self._fail_client(client, codec.error_response("invalid message format", "08P01", "FATAL"))
                    return
                if tag == _P and total < 9:
                    self._fail_client(client, codec.error_response("invalid Parse message", "08P01", "FATAL"))
                    return
                if client.server is None:
                    local = self._without_server(client, tag, buf, pos, total, whole)
                    if local:
                        pos += local
                        continue
                    if not self._acquire(client):
                        break
                consumed = self._client_message(client, tag, buf, pos, total, whole)
                if consumed <= 0:
                    if consumed < 0:
                        return
                    break
                pos += consumed
        finally:
            if not client.closed:
                del buf[:pos]

    def _without_server(self, client: Client, tag: int, buf: bytearray, pos: int, total: int, whole: bool) -> int:
        """Bytes consumed by a message answered without a server (0: it needs one)."""
        if tag == _C and buf[pos + 5] == ord("S") and buf[pos + 6] != 0:
            self._close_name(client, bytes(buf[pos + 6:pos + total - 1]))
            return total
        if tag == _H:
            return total
        if tag == _S:
            self.send_client(client, READY_IDLE)
            return total
        if tag in (_COPY_DATA, _COPY_DONE, _COPY_FAIL):  # after the COPY ended on the server: dropped
            consumed = min(total, len(buf) - pos)
            client.stream = total - consumed
            return consumed
        return 0

    def _client_message(self, client: Client, tag: int, buf: bytearray, pos: int, total: int, whole: bool) -> int:
        """Handle one message for the linked server; bytes consumed, 0 to wait for more, -1 if the
        client was closed."""
        server = client.server
        assert server is not None
        queue = server.queue
        if tag == _Q:
            client.pool.query_count += 1
            if whole:
                if changes_session(bytes(buf[pos + 5:pos + total - 1])):
                    server.dirty = True
            else:
                server.dirty = True
            queue.append(Request(tag, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if tag == _P:
            return self._parse(client, server, buf, pos, total, whole)
        if tag == _B:
            return self._bind(client, server, buf, pos, total, whole)
        if tag == _D:
            kind, name = buf[pos + 5], bytes(buf[pos + 6:pos + total - 1])
            stmt = client.prepared.get(name) if kind == ord("S") and name else None
            if stmt is not None:
                self._ensure(server, stmt)
                queue.append(Request(tag, FORWARD))
                self.send_server(server, codec.frame(b"D", b"S" + stmt.name + b"\0"))
                return total
            queue.append(Request(tag, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if tag == _C:
            if buf[pos + 5] == ord("S") and buf[pos + 6] != 0:
                self._close_name(client, bytes(buf[pos + 6:pos + total - 1]))
                return total
            queue.append(Request(tag, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if tag in (_E, _S):
            if tag == _S:
                client.pool.query_count += 1
            queue.append(Request(tag, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if tag == _F:
            server.dirty = True  # a fast-path function call: the pooler cannot see what it does
            queue.append(Request(tag, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if tag in (_COPY_DONE, _COPY_FAIL):
            if server.copy_mode:
                queue.append(Request(tag, FORWARD))
            client.copy_in = False
            consumed = self._forward(client, server, buf, pos, total)
            self._maybe_release(server)
            return consumed
        return self._forward(client, server, buf, pos, total)  # Flush, CopyData

    def _forward(self, client: Client, server: Server, buf: bytearray, pos: int, total: int) -> int:
        """Pass a message on as it is (its start now, the rest as it arrives)."""
        n = min(total, len(buf) - pos)
        self.send_server(server, bytes(buf[pos:pos + n]))
        client.stream = total - n
        return n

    def _parse(self, client: Client, server: Server, buf: bytearray, pos: int, total: int, whole: bool) -> int:
        if buf[pos + 5] == 0:  # the unnamed statement: passed on
            if not whole or changes_session(bytes(buf[pos + 6:pos + total]).split(b"\0", 1)[0]):
                server.dirty = True
            server.queue.append(Request(_P, FORWARD))
            return self._forward(client, server, buf, pos, total)
        if not whole:
            if total > INSPECT_LIMIT:
                self._fail_client(client, codec.error_response(
                    "prepared statement too long for the pooler (at most 1 MiB)", "54000", "FATAL"))
                return -1
            return 0
        body = bytes(buf[pos + 5:pos + total])
        end = body.find(b"\0")
        if end < 0:
            self._fail_client(client, codec.error_response("invalid Parse message", "08P01", "FATAL"))
            return -1
        name, key = body[:end], body[end + 1:]
        if name in client.prepared:
            self._fail_client(client, codec.error_response(
                f'prepared statement "{name.decode("utf-8", "replace")}" already exists', "42P05", "FATAL"))
            return -1
        if len(client.prepared) >= MAX_CLIENT_STATEMENTS:
            self._fail_client(client, codec.error_response("too many prepared statements for the pooler", "53400",
                                                           "FATAL"))
            return -1
        stmt = self.registry.acquire(client.pool, key)
        if stmt is None:
            self._fail_client(client, codec.error_response("the pooler's prepared statement memory is full",
                                                           "53200", "FATAL"))
            return -1
        client.prepared[name] = stmt
        if stmt.id in server.prepared:
            server.prepared.move_to_end(stmt.id)
            self._fake(client, server, _P)
            return total
        self.send_server(server, stmt.parse_message())
        server.queue.append(Request(_P, FORWARD, stmt))
        self._register(server, stmt)
        return total

    def _bind(self, client: Client, server: Server, buf: bytearray, pos: int, total: int, whole: bool) -> int:
        avail = min(total, len(buf) - pos)
        portal_end = buf.find(b"\0", pos + 5, pos + avail)
        name_end = buf.find(b"\0", portal_end + 1, pos + avail) if portal_end >= 0 else -1
        if name_end < 0:
            if whole or avail >= INSPECT_LIMIT:
                self._fail_client(client, codec.error_response("invalid Bind message", "08P01", "FATAL"))
                return -1
            return 0
        name = bytes(buf[portal_end + 1:name_end])
        stmt = client.prepared.get(name) if name else None
        if stmt is None:  # the unnamed statement, or a name the client never prepared: Postgres answers
            server.queue.append(Request(_B, FORWARD))
            return self._forward(client, server, buf, pos, total)
        self._ensure(server, stmt)
        server.queue.append(Request(_B, FORWARD))
        if stmt.stateful:
            server.dirty = True
        head = (b"B" + _u32.pack(total - 1 - len(name) + len(stmt.name)) + bytes(buf[pos + 5:portal_end + 1])
                + stmt.name + b"\0")
        rest = bytes(buf[name_end + 1:pos + avail])
        self.send_server(server, head + rest)
        client.stream = total - avail
        return avail

    def _close_name(self, client: Client, name: bytes) -> None:
        """Close of a named statement: the client forgets the name; the server keeps the statement."""
        stmt = client.prepared.pop(name, None)
        if stmt is not None:
            self.registry.release(stmt)
        self._fake(client, client.server, _C)

    def _fake(self, client: Client, server: Server | None, tag: int) -> None:
        if server is None or not server.queue:
            self.send_client(client, _FAKES[tag])
        else:
            server.queue.append(Request(tag, FAKE))

    def _ensure(self, server: Server, stmt: Statement) -> None:
        """The statement is prepared on the server before what follows (a dropped Parse if need be)."""
        if stmt.id in server.prepared:
            server.prepared.move_to_end(stmt.id)
            return
        self.send_server(server, stmt.parse_message())
        server.queue.append(Request(_P, SKIP, stmt))
        self._register(server, stmt)

    def _register(self, server: Server, stmt: Statement) -> None:
        self.registry.retain(stmt)
        server.prepared[stmt.id] = stmt
        while len(server.prepared) > self.max_prepared:
            _, victim = server.prepared.popitem(last=False)
            self.send_server(server, codec.frame(b"C", b"S" + victim.name + b"\0"))
            server.queue.append(Request(_C, SKIP, victim))  # its reference is dropped when Postgres confirms

    # Linking -------------------------------------------------------------------------------------

    def _acquire(self, client: Client) -> bool:
        pool = client.pool
        if pool.idle and not pool.paused and not pool.waiting:
            self._link(client, pool.idle.pop())
            return True
        if client.waiting_since is None:
            client.waiting_since = self.now()
            pool.waiting.append(client)
            self.client_reading(client, False)
            self._want(pool)
        return False

    def _link(self, client: Client, server: Server) -> None:
        client.server = server
        server.client = client
        server.state = ACTIVE
        changes = {i: v for i, v in client.params.items() if server.params.get(i) != v}
        if changes:
            request = Request(_Q, SKIP, kind=SETVARS)
            request.names = tuple(changes)
            server.queue.append(request)
            self.send_server(server, set_query(changes))

    def _want(self, pool: Pool) -> None:
        if pool.paused:
            return
        wanted = min(len(pool.waiting) - pool.opening, pool.size - len(pool.servers) - pool.opening)
        for _ in range(wanted):
            pool.opening += 1
            self.want_server(pool)

    def _assign(self, pool: Pool) -> None:
        while pool.waiting and pool.idle and not pool.paused:
            client = pool.waiting.popleft()
            assert client.waiting_since is not None
            pool.wait_time += self.now() - client.waiting_since
            pool.wait_count += 1
            client.waiting_since = None
            self._link(client, pool.idle.pop())
            self.client_reading(client, True)
            self._run_client(client)

    def _maybe_release(self, server: Server) -> None:
        client = server.client
        if (client is not None and server.status == _IDLE_STATUS and not server.queue and not client.copy_in
                and server.state == ACTIVE):
            self._release(server)

    def _release(self, server: Server) -> None:
        client = server.client
        assert client is not None
        client.server = server.client = None
        server.pool.xact_count += 1
        if server.dirty:
            server.dirty = False
            self._forget_statements(server)
            server.state = RESETTING
            server.queue.append(Request(_Q, SKIP, kind=RESET))
            self.send_server(server, DISCARD_ALL)
        else:
            self._idle(server)

    def _idle(self, server: Server) -> None:
        if server.holds:
            server.state = HELD
            return
        server.state = IDLE
        server.idle_since = self.now()
        pool = server.pool
        pool.idle.append(server)
        self._assign(pool)

    # Servers -------------------------------------------------------------------------------------

    def _run_server(self, server: Server) -> None:
        buf = server.inbuf
        pos = 0
        try:
            while server.state != CLOSED:
                avail = len(buf) - pos
                if server.stream:
                    if not avail:
                        break
                    n = min(avail, server.stream)
                    client = server.client
                    if server.stream_to_client and client is not None:
                        self.send_client(client, bytes(buf[pos:pos + n]))
                    pos += n
                    server.stream -= n
                    continue
                if avail < 5:
                    break
                tag = buf[pos]
                total = 1 + _u32.unpack_from(buf, pos + 1)[0]
                if total < 5:
                    self._broken(server)
                    return
                if tag in _SERVER_STREAMED:
                    server.stream = total
                    server.stream_to_client = not self._own_query(server)
                    continue
                if avail < total:
                    if total > SERVER_BUFFER_LIMIT:
                        self._broken(server)
                        return
                    break
                message = bytes(buf[pos:pos + total])
                pos += total
                self._server_message(server, tag, message)
        finally:
            if server.state != CLOSED:
                del buf[:pos]

    @staticmethod
    def _own_query(server: Server) -> bool:
        return bool(server.queue) and server.queue[0].action == SKIP and server.queue[0].tag == _Q

    def _server_message(self, server: Server, tag: int, message: bytes) -> None:
        client = server.client
        if self._own_query(server):
            self._own_query_message(server, tag, message)
            return
        forward = client is not None
        if tag == _READY:
            if len(message) != 6:
                self._broken(server)
                return
            if self._pop(server, (_S, _Q, ord("F"))) is None and server.query_failed:
                self._clear_until(server, (_S,))
            server.query_failed = False
            server.status = message[5]
        elif tag == _PARAM:
            self._parameter(server, message, client)
        elif tag == _ERROR:
            if server.copy_mode:
                server.copy_mode = False
                self._clear_until(server, (_COPY_DONE, _COPY_FAIL))
            server.query_failed = True
        elif tag == _COMPLETE:
            if server.copy_mode:
                server.copy_mode = False
                self._clear_until(server, (_COPY_DONE,))
            if message[5:-1] in _CLEARS_STATEMENTS:
                self._forget_statements(server)
                if client is not None:
                    for stmt in client.prepared.values():
                        self.registry.release(stmt)
                    client.prepared.clear()
            self._pop(server, (_E,))
        elif tag in (_COPY_IN, _COPY_BOTH):
            server.copy_mode = True
            if client is not None:
                client.copy_in = True
        elif tag == _PARSE_OK:
            request = self._pop(server, (_P,))
            forward = forward and not (request is not None and request.action == SKIP)
        elif tag == _BIND_OK:
            self._pop(server, (_B,))
        elif tag == _CLOSE_OK:
            request = self._pop(server, (_C,))
            if request is not None and request.action == SKIP:
                forward = False
                if request.stmt is not None:
                    self.registry.release(request.stmt)
        elif tag in (_NO_DATA, _ROW_DESC):
            self._pop(server, (_D,))
        elif tag in (_EMPTY, _SUSPENDED):
            self._pop(server, (_E,))
        if forward:
            assert client is not None
            client.bytes_out += len(message)
            self.send_client(client, message)
        while server.queue and server.queue[0].action == FAKE:
            request = server.queue.popleft()
            if client is not None:
                self.send_client(client, _FAKES[request.tag])
        if tag == _READY:
            self._maybe_release(server)
            if client is not None and client.terminating and (client.server is None or not server.queue):
                self._fail_client(client, None)  # its answers are out; a transaction still open rolls back

    def _own_query_message(self, server: Server, tag: int, message: bytes) -> None:
        """A response to the pooler's own query (SET of tracked parameters, DISCARD ALL): never forwarded."""
        request = server.queue[0]
        if tag == _PARAM:
            self._parameter(server, message, None)
        elif tag == _ERROR:
            request.error = codec.parse_error_fields(message[5:]).get("M", "error")
        elif tag == _READY:
            server.queue.popleft()
            server.status = message[5] if len(message) == 6 else _IDLE_STATUS
            client = server.client
            if request.kind == RESET:
                if request.error is not None or server.status != _IDLE_STATUS:
                    self._close_server(server)
                else:
                    self._idle(server)
            elif client is not None:
                if request.error is not None:  # the client's startup values were refused (PgBouncer: closes it)
                    client.server = server.client = None
                    self._close_server(server)
                    self._fail_client(client, codec.error_response(request.error, "22023", "FATAL"))
                    return
                for index in request.names:
                    if index in server.params:
                        client.params[index] = server.params[index]  # Postgres' spelling of the value
            while server.queue and server.queue[0].action == FAKE:
                fake = server.queue.popleft()
                if client is not None:
                    self.send_client(client, _FAKES[fake.tag])

    def _parameter(self, server: Server, message: bytes, client: Client | None) -> None:
        from argon.wire.pool_params import tracked_index

        parts = message[5:].split(b"\0")
        if len(parts) < 2:
            return
        index = tracked_index(parts[0].decode("utf-8", "replace"))
        if index is None:
            return
        value = parts[1].decode("utf-8", "replace")
        server.params[index] = value
        if client is not None:
            client.params[index] = value

    def _pop(self, server: Server, tags: tuple[int, ...]) -> Request | None:
        """The oldest request, if it is one of `tags` (a response answers the oldest request)."""
        if not server.queue or server.queue[0].tag not in tags:
            return None
        return server.queue.popleft()

    def _clear_until(self, server: Server, tags: tuple[int, ...]) -> None:
        """Drop requests Postgres skipped (after an error: until the Sync; in COPY: until its end):
        a Parse among them registered nothing, an eviction Close closed nothing."""
        while server.queue:
            request = server.queue.popleft()
            stmt = request.stmt
            if stmt is not None:
                if request.tag == _P:
                    if server.prepared.get(stmt.id) is stmt:
                        del server.prepared[stmt.id]
                        self.registry.release(stmt)
                elif request.tag == _C:
                    server.prepared[stmt.id] = stmt
                    server.prepared.move_to_end(stmt.id, last=False)
            if request.tag in tags:
                break

    def _forget_statements(self, server: Server) -> None:
        for stmt in server.prepared.values():
            self.registry.release(stmt)
        server.prepared.clear()

    def _broken(self, server: Server) -> None:
        """The server sent something that is not the protocol: end it (and its client)."""
        self.server_lost(server)
        self.close_server(server)

    def _drop_server(self, server: Server) -> None:
        pool = server.pool
        server.state = CLOSED
        pool.servers.discard(server)
        if server in pool.idle:
            pool.idle.remove(server)
        self._forget_statements(server)
        for request in server.queue:
            if request.stmt is not None and request.tag == _C:
                self.registry.release(request.stmt)
        server.queue.clear()

    def _close_server(self, server: Server) -> None:
        if server.state == CLOSED:
            return
        client = server.client
        if client is not None:
            client.server = server.client = None
        self._drop_server(server)
        self.close_server(server)
        self._want(server.pool)

    def _fail_client(self, client: Client, error: bytes | None) -> None:
        """Close a client (after `error`, an ErrorResponse): it and its server are let go."""
        if client.closed:
            return
        self.client_lost(client)
        self.close_client(client, error)

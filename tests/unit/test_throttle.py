"""The proxy's limits, without sockets: throttle keys and penalties, the fair PBKDF2 pool, /sql's
work limits and response budget, the iteration cap, internal tokens."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from argon.proxy.auth import Credentials, InternalTokens
from argon.proxy.routing import Route
from argon.proxy.serverless.http_sql import Budget, SharedBytes, WorkLimits
from argon.proxy.serverless.sql_over_http import HttpSqlError
from argon.proxy.throttle import PasswordChecks, Throttle, Throttled, client_key
from argon.wire import scram


def test_clients_are_counted_by_ipv4_address_and_ipv6_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("") == ""


def test_rotating_ipv6_addresses_share_one_penalty() -> None:
    throttle = Throttle(free_per_ip=3, free_per_role=10**6, base_delay=0.1, max_delay=1.0)
    for i in range(6):
        throttle.record_failure(f"2001:db8::{i + 1:x}", f"ep-{i}", "r")  # new address, new role each time
    assert throttle.delay("2001:db8::ffff", "ep-other", "r") > 0  # the /64 as a whole is penalised
    assert throttle.delay("2001:db8:0:1::1", "ep-other", "r") == 0  # the next /64 is someone else


def test_pruning_never_forgets_the_most_attacked_role() -> None:
    throttle = Throttle(max_keys=100, half_life=3600)
    for _ in range(30):
        throttle.record_failure("192.0.2.1", "ep-victim", "owner")
    for i in range(2000):  # a spray of one failure each for made-up roles, from made-up clients
        throttle.record_failure(f"10.{i // 250}.{i % 250}.1", f"ep-x{i}", "nobody")
    assert throttle.failures("ep-victim", "owner") > 29
    assert len(throttle._roles) <= 100 and len(throttle._clients) <= 100


def test_attempts_are_limited_per_client_before_any_work() -> None:
    throttle = Throttle(max_concurrent_per_ip=2, max_waiting=4)
    running = 0
    peak = 0

    async def one() -> str:
        nonlocal running, peak
        try:
            async with throttle.attempt("198.51.100.1", "ep-a", "r"):
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.05)
                running -= 1
            return "ok"
        except Throttled as exc:
            return exc.user_message

    async def main() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(6)))

    results = asyncio.run(main())
    assert peak == 2
    assert results.count("ok") == 4  # two running, two waiting their turn
    assert results.count("Too many connections attempts") == 2


def test_an_attacked_role_takes_few_attempts_at_once() -> None:
    throttle = Throttle(free_per_ip=10**6, free_per_role=2, max_concurrent_per_role=1, max_waiting=100,
                        max_delay=0.01)
    for _ in range(5):
        throttle.record_failure("192.0.2.9", "ep-v", "owner")
    running = 0
    peak = 0

    async def one(i: int) -> None:
        nonlocal running, peak
        async with throttle.attempt(f"203.0.113.{i}", "ep-v", "owner"):  # each from its own address
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(5)))

    asyncio.run(main())
    assert peak == 1


def test_a_client_past_its_free_failures_waits_before_its_check() -> None:
    throttle = Throttle(free_per_ip=1, free_per_role=10**6, base_delay=0.1, max_delay=0.2)
    for _ in range(4):
        throttle.record_failure("192.0.2.50", "ep-a", "r")

    async def timed(ip: str) -> float:
        start = time.monotonic()
        async with throttle.attempt(ip, "ep-a", "r"):
            return time.monotonic() - start

    assert asyncio.run(timed("192.0.2.50")) >= 0.18
    assert asyncio.run(timed("192.0.2.51")) < 0.05


def test_pbkdf2_pool_serves_endpoints_in_turn() -> None:
    checks = PasswordChecks(workers=2)
    lock = threading.Lock()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    def slow(endpoint: str) -> str:
        with lock:
            running[endpoint] = running.get(endpoint, 0) + 1
            peak[endpoint] = max(peak.get(endpoint, 0), running[endpoint])
        time.sleep(0.1)
        with lock:
            running[endpoint] -= 1
        return endpoint

    async def main() -> float:
        hog = [asyncio.ensure_future(checks.run("ep-hog", slow, "ep-hog")) for _ in range(10)]
        await asyncio.sleep(0.01)
        start = time.monotonic()
        assert await checks.run("ep-other", slow, "ep-other") == "ep-other"
        took = time.monotonic() - start
        await asyncio.gather(*hog)
        return took

    try:
        took = asyncio.run(main())
    finally:
        checks.close()
    assert peak["ep-hog"] == 1  # ten requests of one endpoint never take two threads
    assert took < 0.5  # the other endpoint did not wait for the ten


def test_pbkdf2_pool_keeps_a_thread_until_the_computation_ends() -> None:
    checks = PasswordChecks(workers=1)
    release = threading.Event()

    async def main() -> None:
        first = asyncio.ensure_future(checks.run("ep-a", release.wait, 5))
        await asyncio.sleep(0.05)
        first.cancel()  # the client went away; the thread still computes
        second = asyncio.ensure_future(checks.run("ep-b", lambda: "done"))
        await asyncio.sleep(0.1)
        assert not second.done()  # no second thread appeared for it
        release.set()
        assert await asyncio.wait_for(second, 5) == "done"

    try:
        asyncio.run(main())
    finally:
        checks.close()


def test_verifiers_above_the_iteration_cap_are_unusable() -> None:
    secret = scram.ScramSecret.from_password("pw", iterations=16)
    assert secret.usable
    huge = scram.ScramSecret.parse(secret.to_string().replace("$16:", "$1000000000:"))
    assert huge.iterations == 10**9 and not huge.usable
    assert scram.ScramSecret.parse(secret.to_string().replace("$16:", f"${scram.MAX_ITERATIONS}:")).usable


def test_internal_tokens_are_single_use_and_bound_to_their_route() -> None:
    tokens = InternalTokens(ttl=60)
    route = Route("alice", "db", "ep-a", "options")
    creds = Credentials(route, "v", b"k" * 32, b"s" * 32, "pw", b"")
    token = tokens.issue(creds)
    assert tokens.take(token, Route("bob", "db", "ep-a", "options")) is None  # wrong role: and now spent
    token = tokens.issue(creds)
    taken = tokens.take(token, Route("alice", "other", "ep-a-pooler", "options"))
    assert taken is not None and taken.client_key == creds.client_key and taken.route.database == "other"
    assert tokens.take(token, route) is None
    expired = InternalTokens(ttl=-1)
    assert expired.take(expired.issue(creds), route) is None


def test_sql_work_limits_per_endpoint_and_in_all() -> None:
    limits = WorkLimits(per_endpoint=2, total=3, max_waiting=4)  # running + waiting, per gate
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    total_peak = 0

    async def one(endpoint: str) -> str:
        nonlocal total_peak
        try:
            async with limits.turn(endpoint):
                running[endpoint] = running.get(endpoint, 0) + 1
                peak[endpoint] = max(peak.get(endpoint, 0), running[endpoint])
                total_peak = max(total_peak, sum(running.values()))
                await asyncio.sleep(0.03)
                running[endpoint] -= 1
            return "ok"
        except Throttled as exc:
            assert exc.status == 429
            return "refused"

    async def main() -> list[str]:
        return await asyncio.gather(*(one("ep-a") for _ in range(5)), *(one("ep-b") for _ in range(2)))

    results = asyncio.run(main())
    assert peak["ep-a"] == 2 and total_peak == 3
    assert results[:5] == ["ok"] * 4 + ["refused"]  # two run, two wait, the fifth is past the queue
    assert results[5:] == ["ok", "ok"]  # another endpoint still gets its turn


def test_response_budget_and_shared_budget() -> None:
    shared = SharedBytes(150)
    a, b = Budget(100, shared), Budget(100, shared)
    a.charge(90)
    with pytest.raises(HttpSqlError) as err:
        a.charge(20)
    assert err.value.status == 507 and "max is 100 bytes" in err.value.user_message
    with pytest.raises(HttpSqlError) as err:
        b.charge(70)  # fits its own limit, not what is left of the shared one
    assert err.value.status == 503
    a.release()
    b.charge(70)
    assert shared.used == 70


def test_a_client_that_logged_in_before_is_not_held_back_by_an_attack_on_its_role() -> None:
    throttle = Throttle(free_per_ip=10**6, free_per_role=2, max_concurrent_per_role=1, base_delay=0.1, max_delay=0.5)
    throttle.record_success("192.0.2.10", "ep-v", "owner")  # the victim's own application
    for i in range(8):
        throttle.record_failure(f"203.0.113.{i}", "ep-v", "owner")
    assert throttle.delay("203.0.113.99", "ep-v", "owner") == 0.5  # a stranger waits the role's penalty...
    assert throttle.delay("192.0.2.10", "ep-v", "owner") == 0  # ...the known client does not

    async def main() -> float:
        async def attacker() -> None:
            async with throttle.attempt("203.0.113.50", "ep-v", "owner"):
                await asyncio.sleep(0.5)  # holds the attacked role's only place

        hold = asyncio.ensure_future(attacker())
        await asyncio.sleep(0.05)
        start = time.monotonic()
        async with throttle.attempt("192.0.2.10", "ep-v", "owner"):
            took = time.monotonic() - start
        await hold
        return took

    assert asyncio.run(main()) < 0.1

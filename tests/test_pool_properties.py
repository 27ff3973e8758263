"""The pool's desync class, as a property (hypothesis): several clients send random sequences of requests through
one `PoolTransport` to a real upstream on loopback whose behaviour per request is drawn at random (answer before
or after reading the body, close mid-request, close after reading it without answering, keep-alive or close,
chunked or sized reply, a 100 or 103 first, replies and bodies sent slowly). Whatever happens, the upstream's
strict parser (h11) sees exactly the requests the clients sent, none twice unless the method allows a retry, none
holding another's bytes, and every client gets the reply to its own request, or a 502/504 when the upstream
hung up on it (or stalled past the read timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pool_support import CONNECTION, FRAMING, INTERIM, PACE, WHEN, Plan, ScriptedUpstream, reply_body

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import Upstream
from sidecar.proxy.transports.httptools_pool import IDEMPOTENT, PoolTransport

with warnings.catch_warnings():
    # As in test_properties.py: hypothesis's patch writer warns on import; under `filterwarnings = error` that would
    # turn a falsifying example into an INTERNALERROR, so it is imported here first, warning silenced.
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

READ_TIMEOUT = 0.25  # below pool_support.STALL; far above any other pause of the upstream's
# The body as the client hands it to the pool: none, bytes, a stream with its Content-Length, a chunked stream.
BODIES = ("none", "bytes", "sized-stream", "chunked-stream")


@dataclass(frozen=True)
class Call:
    method: str
    body_kind: str
    plan: Plan
    parts: int  # how many pieces a streamed body comes in
    slow_body: bool  # a pause before each piece (the upstream may answer meanwhile)
    expect_continue: bool = False  # `Expect: 100-continue`: the upstream may refuse the body by answering at once


plans = st.builds(Plan, st.sampled_from(WHEN), st.sampled_from(FRAMING), st.sampled_from(CONNECTION),
                  st.sampled_from(INTERIM), st.sampled_from([*PACE[:2], *PACE[:2], "stall"]))  # stalls cost time
calls = st.one_of(
    st.builds(Call, st.sampled_from(["GET", "HEAD"]), st.just("none"), plans, st.just(1), st.just(False)),
    st.builds(Call, st.just("POST"), st.sampled_from(BODIES), plans, st.integers(1, 4), st.booleans(), st.booleans()),
)
scenarios = st.tuples(st.lists(st.lists(calls, min_size=1, max_size=5), min_size=1, max_size=4), st.integers(1, 3))


@dataclass
class Outcome:
    target: str
    call: Call
    body: bytes
    status: int | None = None
    echo: bytes | None = None
    reply: bytes | None = None
    error: BaseException | None = None


def body_of(request_id: str, size: int) -> bytes:
    unit = f"<{request_id}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


async def pieces(data: bytes, parts: int, slow: bool) -> AsyncIterator[bytes]:
    step = max(1, -(-len(data) // parts))
    for start in range(0, len(data), step):
        if slow:
            await asyncio.sleep(0.004)
        yield data[start:start + step]


async def one_call(pool: PoolTransport, outcome: Outcome) -> None:
    call = outcome.call
    headers = [(b"host", b"backend")]
    if call.expect_continue:
        headers.append((b"expect", b"100-continue"))
    body: object = None
    if call.body_kind == "bytes":
        body = outcome.body
    elif call.body_kind == "sized-stream":
        headers.append((b"content-length", b"%d" % len(outcome.body)))
        body = pieces(outcome.body, call.parts, call.slow_body)
    elif call.body_kind == "chunked-stream":
        body = pieces(outcome.body, call.parts, call.slow_body)
    try:
        response = await pool.send(call.method, outcome.target.encode(), headers, body)  # type: ignore[arg-type]
        try:
            outcome.status = response.status
            outcome.echo = dict(response.headers).get(b"x-echo")
            outcome.reply = b"".join([chunk async for chunk in response.body()])
        finally:
            await response.aclose()
    except (UpstreamUnavailable, UpstreamTimeout) as exc:
        outcome.error = exc


async def run(clients: list[list[Call]], max_connections: int) -> tuple[list[Outcome], ScriptedUpstream]:
    upstream = await ScriptedUpstream().start()
    pool = PoolTransport(Upstream("http", "127.0.0.1", upstream.port, ""), connect_timeout=2.0,
                         read_timeout=READ_TIMEOUT, max_connections=max_connections)
    outcomes: list[list[Outcome]] = []
    for c, sequence in enumerate(clients):
        outcomes.append([])
        for n, call in enumerate(sequence):
            request_id = f"c{c}n{n}"
            size = 0 if call.body_kind == "none" else 40 + 37 * n
            outcomes[-1].append(Outcome(call.plan.path(request_id), call, body_of(request_id, size)))

    async def client(mine: list[Outcome]) -> None:
        for outcome in mine:
            await one_call(pool, outcome)

    try:
        await asyncio.wait_for(asyncio.gather(*(client(mine) for mine in outcomes)), 30)
        await asyncio.sleep(0.02)  # whatever the pool sent has been parsed
    finally:
        await pool.aclose()
        await upstream.stop()
    return [o for mine in outcomes for o in mine], upstream


def check(outcomes: list[Outcome], upstream: ScriptedUpstream) -> None:
    assert upstream.garbage == [], upstream.garbage
    sent = {o.target: o for o in outcomes}
    complete: dict[str, int] = {}
    for parsed in upstream.parsed:
        # Only requests a client sent, each with its own method and bytes: never another's head or body.
        assert parsed.target in sent, f"the upstream parsed a request no client sent: {parsed.target!r}"
        outcome = sent[parsed.target]
        assert parsed.method == outcome.call.method
        if parsed.complete:
            assert parsed.body == outcome.body, (parsed.target, parsed.body[:80])
            complete[parsed.target] = complete.get(parsed.target, 0) + 1
        else:
            assert outcome.body.startswith(parsed.body), (parsed.target, parsed.body[:80])
    for outcome in outcomes:
        target, call = outcome.target, outcome.call
        # At most once; twice only for an idempotent method retried after a hang-up (RFC 9112 §9.3.1).
        assert complete.get(target, 0) <= (2 if call.method in IDEMPOTENT else 1), target
        if call.plan.pace == "stall" and call.plan.when in ("early", "after") and call.method != "HEAD":
            # The reply's head and first piece, then silence past the read timeout: a 504 mid-body.
            assert isinstance(outcome.error, UpstreamTimeout), (target, outcome.error)
            assert (outcome.status, outcome.echo) == (200, target.encode())
        elif call.plan.answers:
            # Every client gets the reply to its own request.
            assert outcome.error is None, (target, outcome.error)
            assert (outcome.status, outcome.echo) == (200, target.encode())
            assert outcome.reply == (b"" if call.method == "HEAD" else reply_body(target))
            if call.plan.when == "after":
                assert complete.get(target) == 1, target
        else:
            assert outcome.error is not None, (target, outcome.status)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_the_upstream_parses_exactly_the_requests_the_clients_sent(scenario: tuple[list[list[Call]], int]) -> None:
    """Random requests from several clients through one pool to an upstream behaving at random per request: the
    upstream parses exactly those requests (each at most once, none mixed with another's bytes) and every client
    gets its own reply, or 502/504 only when the upstream hung up on that request."""
    clients, max_connections = scenario
    outcomes, upstream = asyncio.run(run(clients, max_connections))
    check(outcomes, upstream)

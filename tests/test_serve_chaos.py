"""The cheap parts of the chaos suite (bench/chaos.py, issue 14) against the session's app:
the hostile-input list, each answered with a 4xx and the server ready after it, and a short
overload that gets no 500 and leaves the server ready.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.hostile import hostile_cases, run_hostile
from bench.loadclient import Target, exchange, get_request, open_loop
from bench.overload import PROBES, REFUSED, Prober
from serve.settings import IngressSettings

from .conftest import SERVE_KEY, SERVE_PORT
from .test_serve_inputs import JPEG

pytestmark = pytest.mark.integration


@pytest.fixture()
def target(served_app: str) -> Target:
    """The session app's model, as the chaos client addresses it."""
    return Target(SERVE_PORT, "body", SERVE_KEY)


def test_every_hostile_input_gets_a_4xx_and_the_server_stays_ready(
    target: Target, served_bundle
) -> None:
    """The whole list of bench/hostile.py, each case followed by a readiness check."""
    settings = IngressSettings()  # the session app runs with the default limits
    size = list(served_bundle.info.input_size)
    cases = hostile_cases(target, JPEG, size, settings.max_images, settings.max_body_bytes)
    assert len(cases) == 19
    rows = asyncio.run(run_hostile(target, cases))
    for row in rows:
        assert 400 <= row["status"] < 500, row
        assert row["ready_after"] == 200, row
        assert row["error"], row  # a JSON {"error": ...} that says something


def test_a_short_overload_gets_no_500_and_leaves_the_server_ready(target: Target) -> None:
    """Arrivals at 40 per second for 2 s: answered or refused, never a server error."""
    replies, skipped = asyncio.run(open_loop(target, [JPEG], 40.0, 2.0, 60.0, 500))
    assert skipped == 0 and len(replies) == 80
    statuses = [r.status for r in replies]
    assert 200 in statuses, statuses
    for reply in replies:
        assert reply.status == 200 or reply.status in (*REFUSED, 504), (reply.status, reply.body)
        if reply.status != 200:
            assert json.loads(reply.body)["error"], reply.body
    ready = asyncio.run(exchange(SERVE_PORT, get_request(target, "/v2/health/ready"), 30.0))
    assert ready.status == 200, ready.body


def test_the_prober_probes_from_its_own_process_until_stopped(target: Target) -> None:
    """Two rounds of probes, each path answered 200, then nothing more after ``stop``."""

    async def rounds(prober: Prober) -> list:
        prober.start()
        await asyncio.sleep(1.0)
        first = await prober.stop()
        prober.start()  # a second level reuses the process
        await asyncio.sleep(0.3)
        return [first, await prober.stop()]

    prober = Prober(target, every_s=0.2)
    try:
        first, second = asyncio.run(rounds(prober))
    finally:
        prober.close()
    assert not prober.process.is_alive()
    for replies in (first, second):
        assert {r.headers["probe"] for r in replies} == set(PROBES)
        assert all(r.status == 200 for r in replies), [(r.status, r.body) for r in replies]
    assert len(first) >= 2 * len(PROBES)  # a fixed schedule: a round each 0.2 s

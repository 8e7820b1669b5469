"""Bursts against a real ``lethe serve``: a few hundred simultaneous calls (new requests, one
Idempotency-Key sent many times, reads) are all answered, none with a 500, and nothing is lost or
doubled. Excess load is refused with 503 ``overloaded`` and Retry-After, having changed nothing.

Before admission control (service.admission) about 41 simultaneous calls on SQLite, 60 on Postgres,
waited ~30 s and most answered 500.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.deletion_requests.models import DeletionRequest
from tests.service_fixtures import register_digits, request_body

pytestmark = pytest.mark.slow

NEW, SAME_KEY, READS = 120, 40, 80  # 240 simultaneous calls


async def send_all(base: str, headers: dict[str, str], calls: list[tuple[str, str, dict | None, dict]]):
    """Every call at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=120) as client:
        start = asyncio.Event()

        async def one(method: str, path: str, body: dict | None, extra: dict) -> httpx.Response:
            await start.wait()
            return await client.request(method, path, json=body, headers=extra)

        tasks = [asyncio.create_task(one(*call)) for call in calls]
        await asyncio.sleep(0.1)
        start.set()
        return await asyncio.gather(*tasks)


def burst_calls(digits, existing_id: str, run: str) -> list[tuple[str, str, dict | None, dict]]:
    twin = request_body(digits, external_id=f"twin-{run}")
    calls = [("POST", "/deletion-requests", request_body(digits, external_id=f"new-{run}-{i}"), {})
             for i in range(NEW)]
    calls += [("POST", "/deletion-requests", twin, {"Idempotency-Key": f"key-{run}"}) for _ in range(SAME_KEY)]
    calls += [("GET", f"/deletion-requests/{existing_id}", None, {}) for _ in range(READS)]
    # Interleaved, so that reads, writes and the twins arrive together.
    return [calls[i] for i in sorted(range(len(calls)), key=lambda i: (i * 7919) % len(calls))]


def stored(backend, prefix: str) -> int:
    with session_scope(backend.settings.database) as session:
        return session.scalar(select(func.count()).select_from(DeletionRequest)
                              .where(DeletionRequest.external_id.startswith(prefix)))


def assert_only_overloaded_refusals(responses: list[httpx.Response]) -> None:
    for response in responses:
        assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text)
        if response.status_code == 503:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) > 0


def test_a_burst_of_240_simultaneous_calls_is_served_whole_without_a_5xx(
        backend, client, admin, digits, digits_model, start_api):
    assert register_digits(client, admin, digits_model).status_code == 201
    existing = client.post("/deletion-requests", headers=admin, json=request_body(digits, "existing")).json()["id"]
    api = start_api()
    run = uuid.uuid4().hex[:8]
    calls = burst_calls(digits, existing, run)

    responses = asyncio.run(send_all(api.base, admin, calls))

    by_call = list(zip(calls, responses))
    assert {r.status_code for _, r in by_call} <= {200, 202}, sorted({(r.status_code, r.text[:200])
                                                                       for _, r in by_call if r.status_code >= 300})
    new = [r for (method, path, body, extra), r in by_call if method == "POST" and not extra]
    twins = [r for (method, path, body, extra), r in by_call if extra]
    reads = [r for (method, path, body, extra), r in by_call if method == "GET"]
    assert [r.status_code for r in new] == [202] * NEW
    # One request for one key, however often sent at once; each sender is answered as the first was.
    assert [r.status_code for r in twins] == [202] * SAME_KEY and len({r.json()["id"] for r in twins}) == 1
    assert {r.json()["id"] for r in reads} == {existing}
    assert stored(backend, f"new-{run}-") == NEW and stored(backend, f"twin-{run}") == 1


def test_excess_load_is_refused_with_503_and_retry_after_and_changes_nothing(
        backend, client, admin, digits, digits_model, start_api):
    assert register_digits(client, admin, digits_model).status_code == 201
    existing = client.post("/deletion-requests", headers=admin, json=request_body(digits, "existing")).json()["id"]
    # One call at a time, and a waiting room that turns a caller away after a millisecond.
    api = start_api(LETHE_API_DB_CONCURRENCY="1", LETHE_API_QUEUE_SECONDS="0.001")
    run = uuid.uuid4().hex[:8]
    calls = burst_calls(digits, existing, run)

    responses = asyncio.run(send_all(api.base, admin, calls))

    assert_only_overloaded_refusals(responses)
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and (200 in statuses or 202 in statuses)
    accepted_new = sum(1 for (m, _, _, extra), r in zip(calls, responses) if m == "POST" and not extra
                       and r.status_code == 202)
    assert stored(backend, f"new-{run}-") == accepted_new  # a 503 wrote nothing; a 202 was kept
    twins = {r.json()["id"] for (_, _, _, extra), r in zip(calls, responses) if extra and r.status_code < 300}
    assert stored(backend, f"twin-{run}") == len(twins) <= 1

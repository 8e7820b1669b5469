"""An uploaded package is checked in a child process with a time and memory limit: a hostile card is a
422 in bounded time, and the API answers other calls meanwhile."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from service.app import create_app
from service.registry.package_check import PackageLimits, PackageRejected, check_package
from tests.service.registry.test_registry_api import assert_problem, card_with, post_model
from tests.service_fixtures import request_body

LIMITS = PackageLimits(max_parameters=10**9, seconds=60, memory_bytes=4 * 1024**3)


def test_a_card_of_100000_nested_arrays_is_a_422_not_a_recursion_error(client, admin, digits_model):
    card = b"[" * 100_000 + b"]" * 100_000
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "nested too deeply" in problem["detail"]


def test_a_card_asking_for_more_parameters_than_allowed_is_refused_before_anything_is_allocated(
        client, admin, digits_model):
    card = card_with(digits_model, kwargs__embed_dim=100_000, kwargs__num_heads=4)
    started = time.monotonic()
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "LETHE_MAX_MODEL_PARAMETERS" in problem["detail"] and "parameters" in problem["detail"]
    assert time.monotonic() - started < 30  # counted on the meta device: 4 blocks of 10^10 weights, no memory


def test_a_check_that_runs_past_its_time_is_stopped_and_refused(digits_model):
    card = card_with(digits_model, kwargs__depth=100_000)  # building 100,000 blocks takes minutes
    started = time.monotonic()
    try:
        check_package(card, digits_model / "model.safetensors", PackageLimits(10**9, seconds=3, memory_bytes=4 << 30))
    except PackageRejected as exc:
        assert "LETHE_PACKAGE_CHECK_SECONDS" in str(exc)
    else:
        raise AssertionError("a card of 100,000 blocks was accepted")
    assert time.monotonic() - started < 20


def test_a_check_that_needs_more_memory_than_allowed_is_refused(digits_model):
    card = card_with(digits_model, kwargs__depth=20_000)  # meta tensors are free, their modules are not
    try:
        check_package(card, digits_model / "model.safetensors",
                      PackageLimits(10**9, seconds=120, memory_bytes=256 * 1024**2))
    except PackageRejected as exc:
        assert "LETHE_PACKAGE_CHECK_MEMORY_BYTES" in str(exc)
    else:
        raise AssertionError("a card of 20,000 blocks was checked within 256 MiB")


def test_the_api_answers_other_calls_while_a_slow_package_is_checked(backend, admin, digits, digits_model):
    settings = backend.settings.model_copy(update={"package_check_seconds": 8.0})
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        assert post_model(client, admin, package=digits_model).status_code == 201
        slow = {}

        def upload_a_slow_package() -> None:
            card = card_with(digits_model, kwargs__depth=100_000)
            slow["response"] = post_model(client, admin, name="huge", card=card, package=digits_model)
            slow["finished"] = time.monotonic()

        upload = threading.Thread(target=upload_a_slow_package)
        upload.start()
        time.sleep(1.0)  # the check is under way
        statuses = [client.post("/deletion-requests", headers=admin,
                                json=request_body(digits, f"meanwhile-{i}")).status_code for i in range(3)]
        answered = time.monotonic()
        upload.join(60)
    assert statuses == [202, 202, 202]
    assert answered < slow["finished"]  # they did not wait behind the check
    assert_problem(slow["response"], 422, "invalid_model_package")

"""The service fixtures live in tests/service_fixtures.py (the worker tests use them too); the
helpers are re-exported here for the service tests' imports."""

from tests.service_fixtures import Backend, WorkerProcess, make_key, register_digits, request_body, wait_for

__all__ = ["Backend", "WorkerProcess", "make_key", "register_digits", "request_body", "wait_for"]

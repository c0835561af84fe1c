"""Schemathesis against the service's own OpenAPI, with the token: every operation, a bounded number of generated
requests each; no answer may be a server error, and every answer must be documented (status code, content type,
body schema), the 401/403/404/413/422/429 errors included."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402 - after the skip: hypothesis comes with schemathesis
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .service_helpers import AUTH, TOKEN  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _app(home):
    from lora_scripts.service.app import ServiceSettings, create_app

    # schemathesis' ASGI client sends Host: testserver; no runner: generated jobs only queue
    return create_app(ServiceSettings(home=home, token=TOKEN, run_jobs=False, allowed_hosts=["testserver"]))


# built at import: schemathesis generates one test per operation at collection time
_HOME = tempfile.TemporaryDirectory(prefix="lora-fuzz-")
FUZZ_APP = _app(Path(_HOME.name) / "home")
schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)


@pytest.fixture(scope="module")
def fuzz_app():
    return FUZZ_APP


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_fuzz_finds_no_server_error(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS)


def test_every_operation_documents_its_errors(fuzz_app):
    from fastapi.testclient import TestClient

    with TestClient(fuzz_app) as client:
        spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.startswith("/api/") or path == "/metrics":
                assert {"401", "403", "404", "413", "422", "429"} <= set(op["responses"]), (method, path)

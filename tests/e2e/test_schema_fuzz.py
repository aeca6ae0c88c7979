"""Property-based fuzzing of the OpenAPI schema (issue 12): schemathesis generates requests for every
operation from the service's own ``/openapi.json`` (valid and invalid data, with the API key) and
sends them to a real server; no answer may be a 5xx and every documented answer must match its
response schema. About 1-2 minutes on 2 cores (``FUZZ_EXAMPLES`` per operation)."""

from __future__ import annotations

import pytest

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.unit.service.apihelpers import auth

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(e2e_model, e2e_template_index, tmp_path_factory):
    import shutil

    from tests.e2e.conftest import ServerProcess

    d = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(e2e_template_index, d / "idx")
    server = ServerProcess(e2e_model, d / "idx", d / "server.log").start()
    yield server
    server.stop()


def test_no_5xx_and_answers_match_the_schema(fuzz_server):
    """Each operation in turn (schemathesis's pytest plugin does not run under this pytest), with
    Hypothesis driving ``FUZZ_EXAMPLES`` generated requests; the first failure is reported with
    its operation and the shrunk request."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert len(operations) >= 10, [f"{o.method} {o.path}" for o in operations]
    statuses: dict[int, int] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            resp = case.call_and_validate(base_url=fuzz_server.url, headers=auth(),
                                          checks=[not_a_server_error, response_schema_conformance])
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

        try:
            fuzz()
        except Exception as exc:
            raise AssertionError(f"{op.method.upper()} {op.path}: {exc}") from exc
        assert fuzz_server.alive(), fuzz_server.log()
    print("schemathesis statuses:", dict(sorted(statuses.items())))
    assert sum(statuses.values()) >= 5 * len(operations) and 200 in statuses, statuses  # it did fuzz

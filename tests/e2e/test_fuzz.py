"""A bounded random-bytes fuzz of ``python -m web``'s raw socket (tests/e2e/raw_fuzz.py).

Derandomized and small, so CI is deterministic and takes seconds; ``bench/fuzz.py`` runs the same
strategies for minutes with fresh seeds. After every example the process is alive and
``/health`` answers 200; at the end nothing the service logged is a traceback (what it contains
is logged as one WARNING line and counted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from tests.e2e.live_service import LiveService, live_service, tail
from tests.e2e.raw_fuzz import Example, Target, examples, run_example_sync

MAX_EXAMPLES = 150
#: The last example run (a failure report names it).
RECENT: deque[Example] = deque(maxlen=1)


def fuzz_target(service: LiveService, job_id: str) -> Target:
    """The service's port and its WebSocket paths: a live job with and without a token, and a
    job that does not exist."""
    return Target(
        service.port,
        {
            "token": f"/api/generate/{job_id}?token={service.token}",
            "no_token": f"/api/generate/{job_id}",
            "missing_job": f"/api/generate/no-such-job?token={service.token}",
        },
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    environ = {"MAX_CONCURRENCY": "1", "LOCAL_LATENCY_MS": "500-1000", "HEARTBEAT_S": "0.5"}
    with live_service(tmp_path_factory.mktemp("fuzz"), environ) as running:
        yield running


@pytest.fixture(scope="module")
def target(service: LiveService) -> Target:
    return fuzz_target(service, service.submit(20))


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # A dead process fails every later example the same way: shrinking would only hide which
    # example killed it. Hypothesis prints the failing example as it is.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_bytes_never_end_the_process(
    service: LiveService, target: Target, data: st.DataObject
) -> None:
    example = data.draw(examples(target), label="example")
    try:
        run_example_sync(target, example)
    except OSError:
        # A process dies a little after the example that killed it: name that one too.
        pytest.fail(f"the service stopped accepting connections after {list(RECENT)}")
    RECENT.append(example)
    assert service.alive(), tail(service.log_since(0))
    assert service.health() == 200


def test_the_fuzz_left_no_traceback(service: LiveService) -> None:
    """Runs after the fuzz: whatever it made the service raise was contained and logged."""
    logged = service.log_since(0)
    assert "Traceback" not in logged, tail(logged)

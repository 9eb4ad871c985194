"""Fuzz ``python -m web``'s raw socket for minutes: random bytes, mutated requests, broken frames.

The strategies of tests/e2e/test_fuzz.py (tests/e2e/raw_fuzz.py) against one service process
(``STORE=memory``, the local provider, a job streaming throughout), in rounds of fresh seeds until
``--seconds`` have passed. After every example the process must be alive and ``/health`` must
answer 200; the first example that breaks that stops the run and is printed. Prints the examples
run, how their connections ended, and the connection errors the service contained
(``imagegen_connection_errors_total``, by kind), then one JSON line.

    .venv/bin/python -m bench.fuzz --seconds 300 --json bench/results/fuzz.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

from bench import common
from tests.e2e.live_service import LiveService, counter_total, live_service, tail
from tests.e2e.raw_fuzz import Target, examples, run_example_sync
from tests.e2e.test_fuzz import fuzz_target


class ServiceDown(AssertionError):
    """The process died, or ``/health`` stopped answering 200, after an example."""


def fuzz_round(
    service: LiveService, target: Target, round_seed: int, count: int, endings: Counter[str]
) -> None:
    """``count`` examples from ``round_seed``; raises (with the example) if the service broke."""

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(round_seed)
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        example = data.draw(examples(target), label="example")
        ending = run_example_sync(target, example)
        endings[ending.split(":")[0]] += 1
        if not service.alive():
            raise ServiceDown("the process died:\n" + tail(service.log_since(0)))
        if (status := service.health()) != 200:
            raise ServiceDown(f"/health answered {status}")

    one()


def _excerpt(logged: str, lines: int = 60) -> str:
    start = logged.index("Traceback")
    return "\n".join(logged[logged.rfind("\n", 0, start) + 1 :].splitlines()[:lines])


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    environ = {"MAX_CONCURRENCY": "1", "LOCAL_LATENCY_MS": "500-1000", "HEARTBEAT_S": "0.5"}
    endings: Counter[str] = Counter()
    failure = None
    rounds = 0
    with live_service(work_dir, environ) as service:
        target = fuzz_target(service, service.submit(20))
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            try:
                fuzz_round(service, target, args.seed + rounds, args.batch, endings)
            except ServiceDown as exc:
                failure = str(exc)
                break
            finally:
                rounds += 1
        elapsed = time.monotonic() - started
        alive = service.alive()
        errors = service.connection_errors() if alive else {}
        logged = service.log_since(0)
        tracebacks = logged.count("Traceback")
    return {
        "benchmark": "fuzz",
        "machine": common.machine(),
        "examples": sum(endings.values()),
        "rounds": rounds,
        "seconds": round(elapsed, 1),
        "examples_per_s": round(sum(endings.values()) / elapsed, 1) if elapsed else None,
        "endings": dict(endings),
        "connection_errors": errors,
        "connection_errors_total": counter_total(errors),
        "tracebacks_logged": tracebacks,
        # The log from the first traceback on (bounded), for whoever reads the figures.
        "traceback_excerpt": _excerpt(logged) if tracebacks else None,
        "alive": alive,
        "failure": failure,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="run for this long")
    parser.add_argument("--batch", type=int, default=200, help="examples per seed")
    parser.add_argument("--seed", type=int, default=1, help="the first round's seed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as work_dir:
        result = run(args, Path(work_dir))
    result["settings"] = vars(args) | {"json": None}
    print(f"examples run          {result['examples']} in {result['seconds']} s")
    print(f"  ({result['rounds']} rounds of {args.batch}, {result['examples_per_s']}/s)")
    print(f"connections ended by  {result['endings']}")
    print(
        f"connection errors     {result['connection_errors_total']:g} {result['connection_errors']}"
    )
    print(f"tracebacks logged     {result['tracebacks_logged']}")
    print(f"process alive         {result['alive']}")
    if result["traceback_excerpt"]:
        print(f"first traceback:\n{result['traceback_excerpt']}")
    if result["failure"]:
        print(f"FAILED: {result['failure']}")
    common.emit(result, args.json)
    if result["failure"] or not result["alive"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

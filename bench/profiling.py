"""Where a server's CPU time goes: py-spy samples of its process, summed by layer.

``py_spy_record`` samples a process (CPU only: idle threads are not sampled) into py-spy's raw
(collapsed stacks) format; ``analyse`` sums the samples three ways: self time by layer (who owns
the code that was running: a package, our ``actors/`` or ``web/``, the stdlib), self time by
function, and inclusive shares of a few features (a sample counts for a feature when any frame
of its stack belongs to it). py-spy is a dev dependency (pinned in ``constraints.txt``).

Under Python 3.11, py-spy sees a Trio task's stack from the task's own coroutine up: frames of
the scheduler (``unrolled_run``) appear only in samples taken outside any task.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from bench import common


class ProfilerMissing(RuntimeError):
    """py-spy is not installed in this environment."""


@asynccontextmanager
async def py_spy_record(pid: int, out: Path, *, rate: int = 250) -> AsyncIterator[None]:
    """Sample process ``pid`` for the body of the block into ``out`` (raw format).

    With ``--native``, so that time in CPython's garbage collector shows as such instead of
    being charged to whichever Python line allocated the object that triggered it (py-spy then
    pauses the process for each sample: keep ``rate`` moderate).
    """
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise ProfilerMissing("py-spy is not installed: make setup (it is a dev dependency)")
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", str(rate)]
    command += ["--format", "raw", "--output", str(out), "--native"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await trio.sleep(1.0)  # attached
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        with trio.move_on_after(30, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()


OURS = {"actors": "ours: actors/", "web": "ours: web/", "bench": "bench provider + launcher"}
#: Inclusive views: the share of samples with a frame that contains one of these strings
#: (``function (short/path.py``). The lines overlap; indented ones are parts of the line above.
FEATURES = [
    ("HTTP server: hypercorn + h11", ("(hypercorn/", "(h11/")),
    ("  the access log line (hypercorn/logging.py)", ("(hypercorn/logging.py",)),
    ("framework: quart, quart_trio, werkzeug", ("(quart/", "(quart_trio/", "(werkzeug/")),
    ("  CORS (quart_cors)", ("(quart_cors/",)),
    ("  request ids + HTTP metrics (web/observability.py)", ("(web/observability.py",)),
    ("  route POST /api/generate (create_job)", ("create_job (web/routes_jobs.py",)),
    ("  route GET /api/generate/{id} (get_job)", ("get_job (web/routes_jobs.py",)),
    ("JWT verification (jwt/)", ("(jwt/",)),
    ("wire types (cattrs/, web/schemas.py)", ("(cattrs/", "(web/schemas.py")),
    ("JSON (stdlib json/)", ("(json/",)),
    ("job actors: actors/", ("(actors/",)),
    ("  job snapshots (JobActor.snapshot)", ("snapshot (actors/job.py",)),
    ("  fair capacity (actors/capacity.py)", ("(actors/capacity.py",)),
    ("logging (stdlib logging/)", ("(logging/",)),
    ("metrics (prometheus_client/)", ("(prometheus_client/",)),
    ("SSE streams: our loop (web/routes_stream.py)", ("(web/routes_stream.py",)),
    ("  subscription waits (actors/supervisor.py Subscription)", ("Subscription.",)),
    ("  event encoding (_sse_chunk)", ("_sse_chunk (web/routes_stream.py",)),
]
GC = "CPython garbage collector (gc_collect_main)"
_PYTHON_FRAME = re.compile(r":\d+\)$")
#: Native frames of a thread that waits (``--native`` samples idle threads too).
_IDLE = ("PyThread_acquire_lock_timed", "epoll_wait (")
_GC_FRAMES = ("gc_collect_main", "gc_collect_with_callback", "gc_collect_generations")
TRIO_ONLY = "trio alone (scheduler, sockets, threads: nothing else on the stack)"


def _where(frame: str) -> str:
    """The short path of a py-spy frame (``function (trio/_core/_run.py:123)``)."""
    where = frame[frame.rfind(" (") + 2 :].rstrip(")")
    return where.rsplit(":", 1)[0]


def layer_of(frame: str) -> str:
    """Who owns the code of ``frame``: our packages, a third-party package, or the stdlib."""
    where = _where(frame)
    top = where.split("/", 1)[0].removesuffix(".py")
    if top in OURS:
        return OURS[top]
    if where.startswith("<frozen") or top in sys.stdlib_module_names:
        return f"stdlib: {top.removeprefix('<frozen ').rstrip('>')}"
    if where.endswith((".c", ".h")):
        return f"CPython C: {where}"
    return top


def analyse(
    path: Path, top: int = 20, features: Sequence[tuple[str, tuple[str, ...]]] = FEATURES
) -> dict[str, Any]:
    """Sum py-spy's raw samples: self time by layer and by function, inclusive by feature.

    ``features``: the inclusive views (:data:`FEATURES` unless a bench brings its own).
    """
    if not path.exists():
        return {"skipped": "py-spy wrote no profile (ptrace not permitted?)"}
    self_by_layer: Counter[str] = Counter()
    self_by_function: Counter[str] = Counter()
    by_feature: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or any(marker in stack for marker in _IDLE):
            continue
        count = int(count_text)
        total += count
        if any(frame.startswith(_GC_FRAMES) for frame in stack.split(";")):
            self_by_layer[GC] += count
            self_by_function[GC] += count
            by_feature[GC] += count
            continue
        frames = [f for f in stack.split(";") if _PYTHON_FRAME.search(f)]
        if not frames:
            self_by_layer["native only (no Python frame)"] += count
            continue
        leaf = frames[-1]
        self_by_layer[layer_of(leaf)] += count
        name = leaf[: leaf.rfind(" (")]
        self_by_function[f"{name} ({_where(leaf)})"] += count
        for feature, needles in features:
            if any(needle in frame for frame in frames for needle in needles):
                by_feature[feature] += count
        # below trio.run (the launcher and runpy are above it), ignoring C frames
        names = [layer_of(frame) for frame in frames]
        below = names[names.index("trio") :] if "trio" in names else names
        if all(n == "trio" or n.startswith(("stdlib", "CPython")) for n in below):
            by_feature[TRIO_ONLY] += count

    def pct(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    return {
        "samples": total,
        "self_pct_by_layer": pct(self_by_layer, top),
        "self_pct_by_function": pct(self_by_function, top),
        "inclusive_pct_by_feature": [
            (feature, round(100 * by_feature[feature] / total, 1))
            for feature in [*(name for name, _ in features), TRIO_ONLY, GC]
        ],
    }


def print_analysis(analysis: dict[str, Any]) -> None:
    if "samples" not in analysis:
        sys.stdout.write(f"\nprofile: {analysis.get('skipped')}\n")
        return
    sys.stdout.write(f"\nprofile of ours: {analysis['samples']} samples (CPU only)\n")
    common.print_table(["where (inclusive)", "% of samples"], analysis["inclusive_pct_by_feature"])
    sys.stdout.write("\n")
    common.print_table(["layer (self time)", "%"], analysis["self_pct_by_layer"])
    sys.stdout.write("\n")
    common.print_table(["function (self time)", "%"], analysis["self_pct_by_function"])

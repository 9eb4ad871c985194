"""LocalProvider: real PNGs on disk, deterministic pixels, simulated latency and failures.

Rendering runs in ``trio.to_thread``. Under ``autojump_clock`` a task waiting for a thread counts
as blocked, so the clock would jump to the next deadline (a ``fail_after`` included) while Pillow
works. So the rendering tests use the real clock with a generous ``fail_after``, and the latency
tests use the virtual clock and either fail before rendering (``fail_rate=1``) or set no
deadline at all.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from PIL import Image

from actors.errors import TransientProviderError
from actors.providers import ImageProvider, ImageRequest, LocalProvider, LocalProviderSettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RENDER_TIMEOUT_S = 30  # real seconds; a render takes a few tens of milliseconds


def request(
    index: int = 0, prompt: str = "a lighthouse at dusk", job_id: str = "job1"
) -> ImageRequest:
    return ImageRequest(job_id=job_id, index=index, prompt=prompt, attempt=1)


def provider_in(
    images_dir: Path, *, latency_ms: tuple[int, int] = (0, 0), fail_rate: float = 0.0
) -> LocalProvider:
    settings = LocalProviderSettings(
        images_dir=images_dir, latency_ms=latency_ms, fail_rate=fail_rate
    )
    return LocalProvider(settings, rng=random.Random(0))


# Sync helpers: blocking file reads stay out of the async tests (flake8-async ASYNC240).
def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def describe_png(path: Path) -> tuple[str | None, tuple[int, int], str]:
    with Image.open(path) as image:
        return image.format, image.size, image.mode


async def test_writes_a_512px_png_and_returns_its_files_path(tmp_path: Path) -> None:
    provider: ImageProvider = provider_in(tmp_path / "images")

    with trio.fail_after(RENDER_TIMEOUT_S):
        url = await provider.generate(request(index=3))

    assert url == "/files/job1-3.png"
    path = tmp_path / "images" / "job1-3.png"
    assert png_bytes(path).startswith(PNG_SIGNATURE)
    assert describe_png(path) == ("PNG", (512, 512), "RGB")
    assert names_in(tmp_path / "images") == ["job1-3.png"]  # the temporary file is gone


async def test_same_prompt_and_index_give_identical_bytes(tmp_path: Path) -> None:
    provider = provider_in(tmp_path)

    with trio.fail_after(RENDER_TIMEOUT_S):
        await provider.generate(request(index=1, job_id="a"))
        await provider.generate(request(index=1, job_id="b"))
        await provider.generate(request(index=2, job_id="c"))

    first, again, other = (png_bytes(tmp_path / f"{name}.png") for name in ["a-1", "b-1", "c-2"])
    assert first == again
    assert first != other


async def test_fail_rate_one_always_raises_a_transient_error(tmp_path: Path) -> None:
    provider = provider_in(tmp_path, fail_rate=1.0)

    with trio.fail_after(RENDER_TIMEOUT_S), pytest.raises(TransientProviderError):
        await provider.generate(request())

    assert names_in(tmp_path) == []


async def test_latency_is_honoured_exactly_before_a_failure(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    provider = provider_in(tmp_path, latency_ms=(800, 800), fail_rate=1.0)
    t0 = trio.current_time()

    with trio.fail_after(10), pytest.raises(TransientProviderError):
        await provider.generate(request())

    assert trio.current_time() - t0 == 0.8


async def test_latency_is_honoured_exactly_before_a_render(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    provider = provider_in(tmp_path, latency_ms=(800, 800))
    t0 = trio.current_time()

    # No fail_after here: with no deadline pending, the clock cannot jump while the render
    # thread runs, so the only virtual time spent is the simulated latency.
    url = await provider.generate(request())

    assert trio.current_time() - t0 == 0.8
    assert url == "/files/job1-0.png"
    assert names_in(tmp_path) == ["job1-0.png"]


@pytest.mark.parametrize("fail_rate", [-0.1, 1.5])
def test_fail_rate_outside_zero_to_one_is_rejected(tmp_path: Path, fail_rate: float) -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        LocalProviderSettings(images_dir=tmp_path, fail_rate=fail_rate)

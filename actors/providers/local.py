"""The built-in provider: real PNGs rendered with Pillow, so the service runs with no API token."""

from __future__ import annotations

import hashlib
import os
import random
import textwrap
from pathlib import Path

import attrs
import trio
from PIL import Image, ImageDraw, ImageFont

from actors.errors import TransientProviderError
from actors.files import ImageFiles
from actors.providers.base import ImageRequest, ProviderStatistics

SIZE = 512
# Rendering is CPU-bound and runs in worker threads; two threads keep one core for the event loop.
_RENDER_THREADS = trio.CapacityLimiter(2)


@attrs.frozen(kw_only=True)
class LocalProviderSettings:
    """Args:
    images_dir: Where the PNGs are written (served under ``/files/``).
    latency_ms: Simulated generation time, drawn uniformly from this closed range.
    fail_rate: Probability that an attempt fails with a transient error (0 to 1).
    """

    images_dir: Path
    latency_ms: tuple[int, int] = (0, 0)
    fail_rate: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )


class LocalProvider:
    """Renders one PNG per image: deterministic colours from prompt and index, the prompt and the
    image number drawn on it, so a person can see which image is which.

    Concurrency: stateless apart from its random source; any number of workers may call
    :meth:`generate` at once. Rendering runs in a worker thread (at most two at a time).
    """

    name = "local"

    def __init__(
        self,
        settings: LocalProviderSettings,
        *,
        rng: random.Random | None = None,
        files: ImageFiles | None = None,
    ) -> None:
        self.settings = settings
        self._files = files
        self._rng = rng or random.Random()  # noqa: S311 (simulation, not security)
        self._rendered = 0

    async def generate(self, request: ImageRequest) -> str:
        low, high = self.settings.latency_ms
        await trio.sleep(self._rng.uniform(low, high) / 1000)
        if self._rng.random() < self.settings.fail_rate:
            raise TransientProviderError("simulated failure of the local provider")
        name = f"{request.job_id}-{request.index}.png"
        nbytes = await trio.to_thread.run_sync(
            render_png,
            self.settings.images_dir / name,
            request.prompt,
            request.index,
            limiter=_RENDER_THREADS,
        )
        self._rendered += 1
        if self._files is not None:
            self._files.added(request.job_id, name, nbytes)
        return f"/files/{name}"

    async def cancel(self, job_id: str, index: int) -> None:  # noqa: ARG002 (the protocol's)
        """Nothing runs remotely; cancelling ``generate`` already stopped the work."""
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ProviderStatistics:
        low, high = self.settings.latency_ms
        return {"images": self._rendered, "latency_ms": f"{low}-{high}"}


def render_png(path: Path, prompt: str, index: int) -> int:
    """Write the image for ``prompt`` and ``index`` to ``path`` atomically; its size in bytes."""
    digest = hashlib.sha256(f"{index}\x00{prompt}".encode("utf-8", "replace")).digest()
    top, bottom = digest[0:3], digest[3:6]
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):
        mix = y / (SIZE - 1)
        colour = tuple(round(a + (b - a) * mix) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (SIZE, y)], fill=colour)
    big = ImageFont.load_default(size=96)
    small = ImageFont.load_default(size=26)
    draw.text(
        (SIZE / 2, SIZE / 3),
        f"#{index + 1}",
        font=big,
        anchor="mm",
        fill="white",
        stroke_width=4,
        stroke_fill="black",
    )
    lines = textwrap.wrap(prompt, width=30)[:6]
    if len(textwrap.wrap(prompt, width=30)) > 6:
        lines[-1] = lines[-1][:27] + "..."
    draw.multiline_text(
        (SIZE / 2, SIZE * 0.72),
        "\n".join(lines),
        font=small,
        anchor="mm",
        align="center",
        fill="white",
        stroke_width=2,
        stroke_fill="black",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(partial, format="PNG")
    nbytes = partial.stat().st_size
    partial.replace(path)
    return nbytes

"""The seam between the actors and whatever makes the images."""

from __future__ import annotations

from typing import Protocol

import attrs


@attrs.frozen(kw_only=True)
class ImageRequest:
    """One attempt at one image.

    Args:
        job_id: The job the image belongs to.
        index: The image's index in its job (0-based).
        prompt: The prompt, already trimmed and validated.
        attempt: 1 for the first attempt, 2 for the first retry, ...
    """

    job_id: str
    index: int
    prompt: str
    attempt: int


class ImageProvider(Protocol):
    """Makes one image per call.

    ``generate`` returns the image's URL: absolute (``https://...``) or a path the service
    itself serves (``/files/...``). It raises ``TransientProviderError`` for failures worth
    another attempt and ``PermanentProviderError`` for the rest. Cancelling the call must stop
    the work, at the provider too (shielded and bounded in time by the provider itself).
    """

    @property
    def name(self) -> str: ...

    async def generate(self, request: ImageRequest) -> str: ...

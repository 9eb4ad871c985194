"""Image providers: the ``ImageProvider`` protocol and its implementations."""

from actors.providers.base import ImageProvider, ImageRequest
from actors.providers.local import LocalProvider, LocalProviderSettings

__all__ = ["ImageProvider", "ImageRequest", "LocalProvider", "LocalProviderSettings"]

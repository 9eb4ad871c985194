"""HTTP, SSE and WebSocket front of the image-generation service (Quart-Trio under Hypercorn)."""

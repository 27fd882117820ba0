"""Serving: an HTTP API for text-to-image with batching, a VRAM budget, progress, cancellation and metrics.

- ``app.create_app(config)``: the FastAPI app (OpenAI ``/v1/images/generations``, AUTOMATIC1111
  ``/sdapi/v1/txt2img``, jobs with Server-Sent Events, /health, /ready, /metrics, the page at /).
- ``engine.Engine``: the bounded queue and the worker thread that batches requests with equal settings.
- ``vram.VramPlanner``: peak memory of a batch from the configs; the largest batch under a budget.
- ``store.open_store``: jobs and images in SQLite (``--db``) or PostgreSQL (``--store``).
- ``server.serve``: uvicorn with SIGTERM draining.

fastapi and uvicorn are imported by ``app``, ``routes`` and ``server`` only: the planner, store and validation
need neither.
"""

from unnoise.serve.config import DEFAULT_MODEL as DEFAULT_MODEL
from unnoise.serve.config import ServeConfig as ServeConfig

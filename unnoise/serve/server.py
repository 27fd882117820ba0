"""Run the app under uvicorn; on SIGTERM (or a first Ctrl-C) drain: finish accepted jobs, answer new ones 503, exit.

uvicorn's own handler stops listening at once and re-raises the signal after shutdown (exit status -15). Here the
first signal only starts the drain: the server keeps answering (503 for new jobs, /ready 503, job status and
images as usual) until the engine is idle or ``drain_timeout_s`` has passed, then shuts down and exits with 0.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from unnoise.serve.app import create_app
from unnoise.serve.config import ServeConfig


class DrainingServer(uvicorn.Server):
    """uvicorn whose exit signals drain the engine first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float):
        super().__init__(config)
        self.app, self.drain_timeout_s = app, drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None:  # a second signal: stop now
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        print(f"unnoise serve: {signal.Signals(sig).name}: draining (new jobs get 503)", file=sys.stderr)
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        engine = getattr(self.app.state, "engine", None)
        if engine is None:
            self.should_exit = True
        else:
            engine.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None and engine.load_error and not self.should_exit:
            if engine.model_unusable:  # as the other commands report a model they cannot load
                print(f"unnoise serve: error: argument --model: {engine.load_error.split(': ', 1)[1]}", file=sys.stderr)
            else:
                print(f"unnoise serve: the model did not load: {engine.load_error}", file=sys.stderr)
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            if engine.idle() or time.monotonic() > self.drain_deadline:
                print("unnoise serve: drained, exiting", file=sys.stderr)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    """Serve ``config`` until SIGTERM or Ctrl-C; returns after the drain. Exits with 2 if the model's files cannot be
    loaded (one line naming the file), with 1 if loading fails otherwise."""
    app = create_app(config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                               timeout_graceful_shutdown=5, lifespan="on")  # fmt: skip
    DrainingServer(uv_config, app, config.drain_timeout_s).run()
    if app.state.engine.load_error:
        raise SystemExit(2 if app.state.engine.model_unusable else 1)

"""The daemon: one BlockLayer, its frontends in one nursery, one shutdown.

The daemon creates the configured backends (through the command layer, as any frontend
would), runs the block jobs' manager and each frontend, and tells its caller the mount
serves (or why it could not: then nothing is left open). A signal (SIGTERM, SIGINT, SIGHUP),
or a frontend that ends (the FUSE mount unmounted from outside), stops them all. Shutdown is
one path: the frontends stop taking requests and let go of what they hold, the layer drains,
flushes and closes every backend, and only then do the frontends give up their resources
(unmount), so that no acknowledged write is left in a cache. A backend whose final flush
fails is reported to the caller (who exits non-zero), not just logged.

Frontends (:mod:`blkfs.frontends`) are made by the caller from the configuration; the daemon
knows them only as :class:`Frontend`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from blkfs.backend import start_workers
from blkfs.commands import Commands, Exporter
from blkfs.errors import BlockError
from blkfs.jobs.manager import JobManager
from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.daemon")


class Frontend(Protocol):
    """A way in to the backends (FUSE files, later NBD exports and a QMP monitor)."""

    name: str

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start (``task_status.started()`` once serving, or raise BlockError saying why it
        cannot), take requests until stopped, then let go of every backend reference."""

    def stop(self) -> None:
        """Stop taking requests: :meth:`serve` returns soon."""

    async def close(self) -> None:
        """After the backends are closed: give up what remains (unmount)."""


class ExportingFrontend(Frontend, Exporter, Protocol):
    """A frontend that serves NBD exports: the export commands drive it."""


FrontendFactory = Callable[[BlockLayer, Commands], Frontend]
ExporterFactory = Callable[[BlockLayer, Commands], ExportingFrontend]


@dataclass
class DaemonConfig:
    """What a daemon serves: the backends to create (``create`` arguments, as the command
    layer takes them) and the frontends to start."""

    backends: list[dict[str, Any]] = field(default_factory=list)
    image_dirs: list[str] | None = None
    nbd_servers: list[str] = field(default_factory=list)
    """NBD servers nodes may reach when ``image_dirs`` confines them (``--allow-nbd``)."""
    frontends: list[FrontendFactory] = field(default_factory=list)
    exporter: ExporterFactory | None = None
    """The frontend that serves NBD exports, handed to the command layer."""


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.layer = BlockLayer(config.image_dirs, config.nbd_servers)
        self.jobs = JobManager(self.layer)
        self.commands = Commands(self.layer, self.jobs)
        self.frontends: list[Frontend] = []
        self._signals = trio.CancelScope()

    async def run(self, ready: Callable[[str | None], None]) -> list[str]:
        """Serve until stopped; ``ready(None)`` once serving, ``ready(message)`` if the
        daemon could not start (then nothing is left mounted or open). Returns the backends
        whose final flush failed, with why."""
        start_workers()
        try:
            for args in self.config.backends:
                await self.commands.run("create", args)
        except BlockError as exc:
            await self.layer.close()
            ready(f"backend '{args['name']}': {exc}")
            return []
        self.frontends = [make(self.layer, self.commands) for make in self.config.frontends]
        if self.config.exporter is not None:
            self.commands.exporter = self.config.exporter(self.layer, self.commands)
            self.frontends.append(self.commands.exporter)
        failures: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.jobs.serve)
                for frontend in self.frontends:
                    await nursery.start(self._serve, frontend)
                nursery.start_soon(self._stop_on_signal)
                log.info(
                    "serving %d backend(s) through %s",
                    len(self.layer),
                    ", ".join(f.name for f in self.frontends) or "no frontend",
                )
                ready(None)
        except BlockError as exc:  # a frontend could not start
            ready(str(exc))
        finally:
            with trio.CancelScope(shield=True):
                failures = await self.layer.close()
                for frontend in self.frontends:
                    await frontend.close()
        return failures

    def stop(self) -> None:
        """Stop every frontend and cancel the jobs (each leaves its images consistent);
        :meth:`run` then shuts down."""
        self._signals.cancel()
        self.jobs.stop()
        for frontend in self.frontends:
            frontend.stop()

    async def _serve(
        self, frontend: Frontend, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await frontend.serve(task_status=task_status)
        finally:
            self.stop()  # one frontend ending (unmounted from outside) ends the daemon

    async def _stop_on_signal(self) -> None:
        with (
            self._signals,
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        ):
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.stop()
                return

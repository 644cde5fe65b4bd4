"""Worker processes: more processes serving the same listening sockets, to use every core.

Python runs one reactor per process; ``server.workers: N`` makes the parent start N-1 workers
after it has bound the sockets.  Each worker inherits the listening sockets (adopting them with
``adoptStreamPort``) and builds the same service tree against the same database and Maildir
root, so workers share exactly what separate nodes share.  A worker that dies is started again;
what it had acknowledged is already durable.  The parent runs the singletons (the embedded
cluster) and serves connections too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from esp.children import child_environment, python_command
from esp.config import Config
from esp.workerlog import WorkerLog

_FIRST_FD = 3
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


def worker_count(configured: int) -> int:
    return configured if configured > 0 else (os.cpu_count() or 1)


class WorkerProcess(ProcessProtocol):
    transport: Any

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self._log = WorkerLog(index)  # the worker's log events (esp.workerlog)
        self._errors = WorkerLog(index, LogLevel.warn)  # what escapes them: plain text

    def outReceived(self, data: bytes) -> None:
        self._log.received(data)

    def errReceived(self, data: bytes) -> None:
        self._errors.received(data)

    def processEnded(self, reason: Failure) -> None:
        self._log.flush()
        self._errors.flush()
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    log = Logger()

    def __init__(
        self, config: Config, dsn: str, listeners: list[Any], count: int, reactor: Any,
        on_exit: Callable[[int], None] | None = None,
        writer: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.setName("workers")
        self._on_exit = on_exit
        self._writer = writer  # the shared Maildir writer's address, once it is started
        self._config = config
        self._dsn = dsn
        self._listeners = listeners
        self._count = count
        self._reactor = reactor
        self._workers: dict[int, WorkerProcess] = {}
        self._failures: dict[int, int] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        config = self._config.model_copy(
            update={
                "storage": self._config.storage.model_copy(
                    update={
                        "database": self._config.storage.database.model_copy(
                            update={"dsn": self._dsn}
                        )
                    }
                ),
                "server": self._config.server.model_copy(update={"workers": 1}),
            }
        )
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        argv = python_command("esp.worker")
        for offset, listener in enumerate(self._listeners):
            fd = _FIRST_FD + offset
            sock = listener.port.socket
            child_fds[fd] = listener.port.fileno()
            argv += ["--listener", f"{listener.name}={fd}:{int(sock.family)}"]
        address = self._writer()
        if address is not None:
            argv += ["--writer", address]
        else:
            # It would start a Maildir writer of its own (the main one is not started yet).
            self.log.error("worker {index} starts without the shared Maildir writer", index=index)
        protocol = WorkerProcess(self, index)
        env = child_environment(
            {"ESP_WORKER_CONFIG": json.dumps(config.model_dump(mode="json"))})
        process = self._reactor.spawnProcess(protocol, sys.executable, argv, env=env,
                                             childFDs=child_fds)
        protocol.pid = process.pid
        self._workers[index] = protocol
        self.log.info("started worker {index}", index=index)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if self._on_exit is not None and worker.pid is not None:
            self._on_exit(worker.pid)
        if not self.running:
            return
        failures = self._failures.get(worker.index, 0)
        self._failures[worker.index] = failures + 1
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        self.log.warn(
            "worker {index} ended ({reason}); starting it again in {delay}s",
            index=worker.index, reason=reason.getErrorMessage(), delay=delay,
        )
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._workers:
            self._spawn(index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ended = []
        for worker in list(self._workers.values()):
            ended.append(worker.ended)
            try:
                worker.transport.signalProcess("TERM")
            except Exception as e:  # already gone
                self.log.debug("worker {index}: {error}", index=worker.index, error=str(e))
        return DeferredList(ended)

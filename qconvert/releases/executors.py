"""Where jobs run: here, one after another, or as Ray tasks sized by their plans.

An executor runs waves of ``(function, job)`` tasks (a job has ``label``,
``cpus``, ``gpus``, ``memory`` and ``cleanup(out)``; the function takes the
job, the release folder and ``quiet``) and calls ``done(job, result)`` on the driver as each
finishes, so the manifest is written in one place.  A wave ends before the next
starts: calibrations before the outputs that read them.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from qconvert.core.errors import QConvertError

GIB = 1 << 30


class LocalExecutor:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, tasks, out: Path, done: Callable) -> None:
        for function, job in tasks:
            try:
                result = function(job, str(out), self.quiet)
            except QConvertError as exc:
                raise QConvertError(f"{job.label}: {exc}") from None
            done(job, result)


class RayExecutor:
    """Tasks on a Ray cluster (``address``) or a local Ray started for the run (and stopped after it)."""

    def __init__(self, address: str | None, quiet: bool):
        try:
            import ray
        except ImportError:
            raise QConvertError("--executor ray needs Ray: pip install 'qconvert[ray]'") from None
        self.ray, self.address, self.quiet = ray, address, quiet

    def __enter__(self) -> "RayExecutor":
        if self.address:
            _check_reachable(self.address)
        try:
            self.ray.init(address=self.address or None, ignore_reinit_error=True, include_dashboard=False,
                          log_to_driver=not self.quiet, logging_level="ERROR")
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError for a bad address
            raise QConvertError(f"Ray at {self.address or '(local)'} does not answer: {type(exc).__name__}: "
                                f"{_first_line(exc, 200)}") from None
        return self

    def __exit__(self, *exc) -> None:
        if not self.address:
            self.ray.shutdown()

    def run(self, tasks, out: Path, done: Callable) -> None:
        ray = self.ray
        _fits_cluster(ray, [job for _, job in tasks])
        pending = {}
        for function, job in tasks:
            remote = ray.remote(max_retries=0)(function)
            ref = remote.options(num_cpus=job.cpus, num_gpus=job.gpus, memory=job.memory).remote(job, str(out), True)
            pending[ref] = job
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    if isinstance(cause, QConvertError):
                        raise QConvertError(f"{job.label} (on Ray): {cause}") from None
                    raise QConvertError(f"{job.label} failed on Ray: {type(cause).__name__}: "
                                        f"{_first_line(cause, 300)}") from None
                done(job, result)
        except BaseException:
            # a failure or Ctrl-C: tasks left running on a cluster would go on writing into the release
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=30)
            for job in pending.values():
                job.cleanup(out)
            raise


def executor(kind: str, *, address: str | None, quiet: bool):
    return RayExecutor(address, quiet) if kind == "ray" else LocalExecutor(quiet)


def _first_line(exc: BaseException, limit: int) -> str:
    text = str(exc)
    return text.splitlines()[0][:limit] if text else ""


def _check_reachable(address: str) -> None:
    """A dead address makes ray.init retry for minutes: try the port first (5 s)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise QConvertError(f"--address {address}: give HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise QConvertError(f"Ray at {address} does not answer ({exc.strerror or exc}); start the cluster "
                            "(ray start --head) or check the address") from None


def _fits_cluster(ray, jobs) -> None:
    """A task no node can hold would wait forever: say so before submitting anything."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for job in jobs:
        if not any(r.get("CPU", 0) >= job.cpus and r.get("GPU", 0) >= job.gpus and r.get("memory", 0) >= job.memory
                   for r in nodes):
            raise QConvertError(f"{job.label} needs {job.cpus} CPU, {job.gpus} GPU and {job.memory / GIB:.1f} GiB "
                                "of memory on one node; no node of the Ray cluster has that (lower [build] cpus, "
                                "or add a larger node)")

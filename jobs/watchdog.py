"""The guard of a run's driver against hanging without a word: the stall watchdog while the plan streams
(the CPU check before any work is jobs/cluster.py's)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter

log = logging.getLogger("docqa")


class RunStalled(RuntimeError):
    """No result row arrived for ``limits.stall_timeout_s``; the message says what was pending."""


class RunInterrupted(RuntimeError):
    """The user stopped the run (Ctrl-C); the message says what was committed and how to resume."""


def describe_pending() -> str:
    """What the cluster is waiting for: free against total resources, the resource demands nothing can
    place (the autoscaler's view), and the actors that are not alive."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    lines = [
        "cluster resources free/total: "
        + ", ".join(f"{name} {free.get(name, 0):g}/{total[name]:g}" for name in ("CPU", "GPU") if name in total)
    ]
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        demands = [
            f"{dict(request.bundle)}: {request.count} pending tasks/actors"
            for demand in status.resource_demands.ray_task_actor_demand
            for request in demand.bundles_by_count
        ]
        lines.append("pending demands: " + ("; ".join(demands) if demands else "none"))
    except Exception as error:  # noqa: BLE001 - a diagnosis must not hide the stall itself
        lines.append(f"pending demands: unknown ({type(error).__name__})")
    try:
        from ray._private.state import actors

        states = Counter(
            f"{info['ActorClassName']} {info['State']}" for info in actors().values() if info["State"] != "DEAD"
        )
        lines.append("actors: " + (", ".join(f"{n} x {name}" for name, n in sorted(states.items())) or "none"))
    except Exception as error:  # noqa: BLE001
        lines.append(f"actors: unknown ({type(error).__name__})")
    return "\n  ".join(lines)


class StallWatchdog:
    """Stops the run when no row arrives for ``timeout_s``: it records what is pending, then interrupts the
    driver's main thread (SIGINT, which also wakes a blocked wait), where the run turns the interrupt into
    ``RunStalled``. ``beat`` on every row batch. A driver started with SIGINT ignored (``nohup``, some
    schedulers) gets Python's handler back for the duration, or the interrupt would do nothing."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last_row = time.monotonic()
        self.diagnosis: str | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # the interrupt is sent only while the run is still being watched
        self._thread = threading.Thread(target=self._watch, name="docqa-stall-watchdog", daemon=True)
        self._previous_handler = None

    def __enter__(self) -> StallWatchdog:
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if handler in (signal.SIG_IGN, signal.SIG_DFL, None):
                self._previous_handler = handler
                signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._stopped.set()
        self._thread.join()
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)

    def beat(self) -> None:
        self.last_row = time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.wait(min(5.0, self.timeout_s / 4)):
            if time.monotonic() - self.last_row < self.timeout_s:
                continue
            pending = describe_pending()  # may take seconds on a sick cluster: check again afterwards
            with self._lock:
                waited = time.monotonic() - self.last_row
                if self._stopped.is_set() or waited < self.timeout_s:
                    continue
                self.diagnosis = (
                    f"no result row for {waited:.0f} s (limits.stall_timeout_s={self.timeout_s:g}); "
                    f"pending:\n  {pending}"
                )
                log.error("%s", self.diagnosis)
                os.kill(os.getpid(), signal.SIGINT)
                return

    def stalled(self) -> RunStalled:
        return RunStalled(
            f"{self.diagnosis}\nthe run stopped; what it committed is kept, and running it again with the same "
            "run id (the same nightly) resumes it"
        )

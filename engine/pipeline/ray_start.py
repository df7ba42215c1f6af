"""Connecting to Ray: a local Ray (or a cluster) started in a background thread, so its start-up
(seconds: GCS, raylet, workers) overlaps with the driver importing and building the stream.

Workers get an offline hub, no usage stats, no auth tokens, and passive OpenMP waiting: a CPU actor
shares its cores with the score actor, the driver and Ray's own processes, and OpenMP threads that
spin at every barrier while one of them is descheduled made CPU generation many times slower on a
busy machine (measured: one UNet call 14 s spinning vs 0.5 s passive with 2 threads on a loaded
2-core machine). A value set in the driver's environment wins. The engine's code is shipped to the
workers as engine.pipeline.shipping decides, and an existing cluster's nodes report their engine
before work starts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any

from engine.pipeline.raynoise import filter_ray_loggers
from engine.pipeline.shipping import code_runtime_env, report_node_engines, should_ship
from engine.pipeline.warm_state import warm_address

logger = logging.getLogger(__name__)

WORKER_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}
WORKER_ENV_PASSTHROUGH = [
    "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "ENGINE_CONFIG_DIR", "RAY_AUTH_MODE", "OMP_WAIT_POLICY",
    "ENGINE_FAULT_INJECT",  # engine.pipeline.sink's fault hook, for tests
]
# Object-store endpoints and credentials: write tasks on every node open the output themselves.
STORAGE_ENV_PASSTHROUGH = [
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
]  # fmt: skip


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV_DEFAULTS)
    env.update({k: os.environ[k] for k in WORKER_ENV_PASSTHROUGH + STORAGE_ENV_PASSTHROUGH if k in os.environ})
    return env


def init_ray(cluster: str | None, ship_code: bool | None = None, toy_weights: bool = False) -> None:
    """ray.init: `cluster` ('auto' reads RAY_ADDRESS), else a fresh local Ray. Shipping the engine's
    code to the workers defaults to on for an existing cluster; `toy_weights`: the toy-world
    weights go too."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ship = should_ship(cluster, ship_code)
    runtime_env = {"env_vars": worker_env(), **(code_runtime_env(toy_weights) if ship else {})}
    # Ray's own INFO lines drown the CLI's output; --verbose turns the engine's logging back on.
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if cluster:
        context = ray.init(address=cluster, runtime_env=runtime_env, **quiet)
    elif (warm := warm_address()) is not None:
        # `engine up`'s local Ray (engine.pipeline.warm): the same machine, so no code shipped, no node report.
        print(f"Ray: the warm local Ray at {warm} (engine up; engine down stops it)", file=sys.stderr)  # noqa: T201 (before logging is set up)
        context = ray.init(address=warm, runtime_env=runtime_env, **quiet)
    else:
        # address="local": always a fresh local Ray, never a cluster that `ray start` left running
        # on this machine (ray.init() alone would join it).
        logger.info("Ray: a new local Ray for this run (engine up keeps one warm)")
        context = ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **quiet)
    if getattr(context, "dashboard_url", None):
        print(f"Ray dashboard: http://{context.dashboard_url.removeprefix('http://')}", file=sys.stderr)  # noqa: T201 (before logging is set up)
    if cluster or ship:
        report_node_engines(ray, shipped=ship)


def exit_on_sigterm() -> None:
    """What ray.init does when it runs on the main thread, done here because it runs on another:
    SIGTERM (`timeout`, `kill`, a scheduler cancelling the job) raises SystemExit in the main
    thread, so the run's `finally` blocks still release the output's lock and shut Ray down
    (Ray's core worker would otherwise abort the process). A Python handler installed by someone
    else is kept."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_for_signal)


def _exit_for_signal(signum, frame) -> None:
    sys.exit(128 + signum)


class RayStart:
    """`init_ray` in a background thread; `ready()` waits for it and raises its error, if any.

    The thread lives until `close()`: Ray starts its GCS and raylet with a parent-death signal,
    which the kernel sends when the *thread* that spawned them exits, so a thread that returned
    right after ray.init would take the local Ray down with it."""

    def __init__(self, cluster: str | None, init=init_ray, **options):
        filter_ray_loggers()  # before ray.init logs from this thread
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(init, cluster, options), name="ray-start",
                                        daemon=True)
        self._thread.start()

    def _run(self, init, cluster, options) -> None:
        try:
            init(cluster, **options)
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread by ready())
            self._error = error
        finally:
            self._started.set()
        self._release.wait()

    def join(self) -> None:
        """Wait until the start finished (or failed)."""
        self._started.wait()

    def ready(self):
        self.join()
        if self._error is not None:
            raise self._error
        exit_on_sigterm()  # after ray.init: its core worker installs a SIGTERM handler that aborts
        import ray

        return ray

    def close(self) -> None:
        """After ray.shutdown(): let the starting thread end."""
        self._release.set()
        self._thread.join()


class _Running:
    """A Ray this process had already started (tests' session Ray): ready at once, never shut down."""

    def ready(self):
        import ray

        return ray


@contextmanager
def ray_starting(cluster: str | None, ship_code: bool | None = None, toy_weights: bool = False):
    """Yield an object whose `ready()` returns the ray module once connected. A Ray already running
    in this process is reused (tests); otherwise one is started in the background and shut down at
    the end (after its start finished, so no half-started local Ray is left behind)."""
    import ray

    if ray.is_initialized():
        yield _Running()
        return
    start = RayStart(cluster, ship_code=ship_code, toy_weights=toy_weights)
    try:
        yield start
    finally:
        start.join()
        ray.shutdown()
        start.close()


@contextmanager
def ray_session(cluster: str | None, ship_code: bool | None = None, toy_weights: bool = False):
    """The ray module, connected: `ray_starting` for callers with nothing to do meanwhile."""
    with ray_starting(cluster, ship_code, toy_weights) as start:
        yield start.ready()

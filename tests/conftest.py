"""Shared fixtures: offline environment, one session-wide local Ray, tiny pipelines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs without a `judges:` key use these (engine.scoring.registry): random tiny judges, no weights.
os.environ.setdefault("ENGINE_JUDGES", "clip:tiny,imagenet:tiny")
# Tests keep their own Ray: an `engine up` Ray of this machine is never found (engine.pipeline.warm).
os.environ["ENGINE_STATE_DIR"] = tempfile.mkdtemp(prefix="engine-state-")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Generated inputs (tests/specs/test_fuzz_validation.py): CI tries 100 per test, a local run 15;
# both derandomized, so a failure reproduces. HYPOTHESIS_PROFILE picks one by hand.
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None)
settings.register_profile("dev", max_examples=15, derandomize=True, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session; engine.pipeline.run reuses it instead of starting its own."""
    import ray

    from engine.pipeline.run import worker_env

    # Test modules are importable in the workers too: a probe a test registers (PROBE_REGISTRY
    # entry "test_x:Probe") runs in the stream's actors.
    # Test files sit in one folder per package, each folder on sys.path (pytest's rootdir-less import).
    folders = [TESTS, *sorted(p for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]
    python_path = os.pathsep.join(p for p in [*map(str, folders), str(TESTS.parent), os.environ.get("PYTHONPATH")] if p)
    env = {**worker_env(), "PYTHONPATH": python_path}
    # address="local": a Ray of our own even when a `ray start` cluster runs on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run_args() -> list[str]:
    """`engine run` arguments (all but --output) of the tiny model's three-image church run: 3
    denoising steps, the tiny judges."""
    return ["--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images", "3",
            "--probe-param", "standard_prompt.num_inference_steps=3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_session, tiny_run_args) -> Path:
    """That run, made once on the session's Ray and read by the end-to-end, export and resume tests
    (none writes to it)."""
    from typer.testing import CliRunner

    from engine.cli import app

    output = tmp_path_factory.mktemp("tiny-run") / "a"
    result = CliRunner().invoke(app, ["run", *tiny_run_args, "--output", str(output)])
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, ray_session) -> tuple[Path, str]:
    """`engine demo --num-images 1` (the toy world's ESD-x model and the base model under four probes,
    judged, with its report) on the session's Ray: its output folder and what it printed. Read by the
    demo test and the browser test (neither writes to it)."""
    from typer.testing import CliRunner

    from engine.cli import app

    output = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(app, ["demo", "--num-images", "1", "--output", str(output)])
    assert result.exit_code == 0, result.output
    return output, result.output


@pytest.fixture(scope="session")
def tiny_pipe():
    from engine.models.builtin import build_tiny

    pipe = build_tiny()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_erased_pipe():
    from engine.models.builtin import build_tiny_erased

    pipe = build_tiny_erased()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # One torch thread per core: under `-n 2` each worker gets one (more would fight over the cores).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, 2 // workers))


# --------------------------------------------------------------------------- parallel runs (pytest-xdist)

# Session fixtures that cost a run each, and the test files that use them. Under `-n N` (what
# scripts/test.sh runs) each file's tests stay on one worker, so its module fixtures are made once,
# and the files of one shared run are one group, so the run is made once.
SHARED_RUN_FILES = {
    "tiny_run": ("tests/pipeline/test_run_e2e.py", "tests/export/test_hf_export.py"),
    "demo_run": ("tests/cli/test_demo.py", "tests/browse/test_browser.py"),
    "paper_plan_output": ("tests/pipeline/test_fault_classes.py", "tests/pipeline/test_memory_plan.py"),
}
GROUP_OF_FILE = {path: run for run, paths in SHARED_RUN_FILES.items() for path in paths}


def _test_file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    """A test file that uses a shared run but is not in its group would make that run again."""
    unlisted = sorted({f"{_test_file(item.nodeid)} ({run})" for item in items for run in SHARED_RUN_FILES
                       if run in item.fixturenames and GROUP_OF_FILE.get(_test_file(item.nodeid)) != run})
    if unlisted:
        raise pytest.UsageError(f"add to SHARED_RUN_FILES in tests/conftest.py: {', '.join(unlisted)}")


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown to a pytest without it
def pytest_xdist_make_scheduler(config, log):
    """Like xdist's `--dist loadfile`, with the files of each shared run as one unit. (Its own
    `loadgroup` marks are lost on pytest 9, whose node ids they can no longer extend.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSharedRuns(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = _test_file(nodeid)
            return GROUP_OF_FILE.get(path, path)

    return FilesAndSharedRuns(config, log)

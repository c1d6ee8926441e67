"""Suite-wide isolation: each test module starts and ends without a Ray instance attached to this process.

Jobs called in-process (pretrain, sft, dpo, rs-rounds) connect to Ray and, like any driver, leave it connected; a
later module that starts its own local Ray (with other resources, or Serve) must not inherit that one.

The suite runs on two pytest-xdist workers (scripts/test.sh: ``-n 2 --dist loadfile``, a module stays on one worker);
artifacts that several modules share are still built once per session, by whichever worker asks first
(``once_per_session``).
"""

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

# Ray Train's controller polls its workers every 2 s by default, so it notices a finished, failed or reporting worker
# group up to 2 s late, in each of the suite's ~20 training runs; a missed poll only counts as a hang after 10 min
# (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), so polling faster changes no outcome. Set before any Ray starts, so the
# nodes of tests/raycluster.py and the jobs run in subprocesses inherit it too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Each xdist worker keeps its Ray instances in a temp directory of its own. Ray's default one is shared, and a local
# cluster that ``ray.cluster_utils.Cluster`` (test_storage_uri) starts writes its address into
# <temp>/ray/ray_current_cluster, where any ``ray.init()`` without an address — in the other worker too — finds it
# and joins that cluster (or fails: "When connecting to an existing cluster, num_cpus … must not be provided", seen
# in a 3-worker trial). Set before any Ray starts; subprocess jobs and their instances inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _ray_tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp"), f"ray-{os.environ['PYTEST_XDIST_WORKER']}")
    _ray_tmp.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(_ray_tmp)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 — Serve was not running
            pass
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _fresh_ray_per_module():
    _shutdown_ray()
    yield
    _shutdown_ray()


def once_per_session(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(directory)`` once per test session, its result (JSON-able) returned to every caller. Under pytest-xdist
    each worker is its own process with its own session fixtures: the first worker to ask builds under a file lock in
    the base temp directory all workers share, the others wait on the lock and read the recorded result."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base temp dir lies in the session's
    result = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.exists():
            directory = root / name
            directory.mkdir()
            result.write_text(json.dumps(build(directory)))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def sft_task(tmp_path_factory):
    """The one-digit-addition SFT task of tests/sft_task.py (files and tokenizer), made once per session."""
    from sft_task import make_task

    files = once_per_session(tmp_path_factory, "sft-task", lambda d: {k: str(v) for k, v in make_task(d).items()})
    return {k: Path(v) for k, v in files.items()}


@pytest.fixture(scope="session")
def sft_trained(sft_task, tmp_path_factory):
    """One full SFT run on ``sft_task``, trained once per session: (run dir, sft() result). Read it, never write
    into it (test_sft checks its metrics; test_dpo and test_rs_rounds start from its export)."""
    from sft_task import train_full

    def train(storage: Path) -> list:
        run_dir, out = train_full(sft_task, storage)
        return [str(run_dir), out]

    run_dir, out = once_per_session(tmp_path_factory, "sft-runs", train)
    return Path(run_dir), out


# Modules that take minutes, longest first (serial seconds on the 2-core box: cluster ~400-600, dpo ~210, pretrain
# ~200, grpo ~150, serve_scaling ~120, storage_uri ~115, serve_cluster ~100, corpus ~95, serve ~95, rs_rounds ~90,
# sft ~70).
# scripts/test.sh runs the suite on two xdist workers that take whole modules in collection order
# (``--dist loadfile --no-loadscope-reorder``): these start first, so that no long module is left to run alone at the
# end while the other worker idles. A stale list costs time, never correctness.
LONG_MODULES = ["test_cluster.py", "test_dpo.py", "test_pretrain.py", "test_grpo.py", "test_serve_scaling.py",
                "test_storage_uri.py",
                "test_serve_cluster.py", "test_corpus.py", "test_serve.py", "test_rs_rounds.py", "test_sft.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: a module's tests keep their order, the other modules theirs

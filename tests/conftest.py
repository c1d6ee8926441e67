"""Suite-wide isolation: each test module starts and ends without a Ray instance attached to this process.

Jobs called in-process (pretrain, sft, dpo, rs-rounds) connect to Ray and, like any driver, leave it connected; a
later module that starts its own local Ray (with other resources, or Serve) must not inherit that one.
"""

import os

import pytest

# Ray Train's controller polls its workers every 2 s by default, so it notices a finished, failed or reporting worker
# group up to 2 s late, in each of the suite's ~20 training runs; a missed poll only counts as a hang after 10 min
# (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), so polling faster changes no outcome. Set before any Ray starts, so the
# nodes of tests/raycluster.py and the jobs run in subprocesses inherit it too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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


@pytest.fixture(scope="session")
def sft_task(tmp_path_factory):
    """The one-digit-addition SFT task of tests/sft_task.py (files and tokenizer)."""
    from sft_task import make_task

    return make_task(tmp_path_factory.mktemp("sft-task"))


@pytest.fixture(scope="session")
def sft_trained(sft_task, tmp_path_factory):
    """One full SFT run on ``sft_task``, trained once per session: (run dir, sft() result). Read it, never write
    into it (test_sft checks its metrics; test_dpo and test_rs_rounds start from its export)."""
    from sft_task import train_full

    return train_full(sft_task, tmp_path_factory.mktemp("sft-runs"))

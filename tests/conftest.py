"""Suite-wide isolation: each test module starts and ends without a Ray instance attached to this process.

Jobs called in-process (pretrain, sft, dpo, rs-rounds) connect to Ray and, like any driver, leave it connected; a
later module that starts its own local Ray (with other resources, or Serve) must not inherit that one.
"""

import pytest


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

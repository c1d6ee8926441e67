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

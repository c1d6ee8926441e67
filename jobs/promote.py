"""Roll a new checkpoint into the running Serve application without dropping requests.

Runbook::

    llamaray promote --config serve-tiny --model runs/dpo/hf       # the same --config/--set as the serve command
    curl -s http://127.0.0.1:8000/v1/models | python -m json.tool  # "hash" is now the new weights' sha256 prefix

How: the application is redeployed (``serve.run``) with the new directory as its ``user_config``. Ray 2.60 gives
every imperative redeploy a new code version, so Serve rolls the replicas: new ones load the new weights while the
old ones keep serving (``scaling.max_surge_percent`` extra replicas; the deployment is never without a running
replica, which would answer 503) and an old one is stopped only after its running requests have finished
(``scaling.graceful_shutdown_timeout_s``), so no request is dropped (tests/test_serve.py streams through a promote). Pass the same config as at ``serve`` time.
The new directory is checked first (config.json, readable safetensors headers, tokenizer): a checkpoint that cannot
load would leave the application DEPLOY_FAILED. Then the job waits until the application is RUNNING and
``/v1/models`` reports the new hash on several answers in a row.
For an in-place reload without replica restarts, deploy with ``serve deploy serve_config.yaml`` and change only
``deployments[].user_config.model_dir`` there (see that file).
What it leaves out: a canary / traffic split (Serve has no weighted routing between versions of one deployment).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import urllib.request

from jobs.serve import MODEL_FLAG, ServeJobConfig, check_model_dir, deploy, with_api_key
from core.config import run_job


def served_hash(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    req = urllib.request.Request(f"{url}/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.load(r)["data"][0]["hash"]


def promote(cfg, *, engine_cls: type | None = None, settle_s: float = 120.0) -> str:
    """Redeploy ``cfg`` (whose ``model`` is the new directory); returns the new hash once the server reports it."""
    from actors.engines import model_hash

    new_dir = check_model_dir(cfg.model, "promote")
    want = model_hash(new_dir)
    url = deploy(cfg, engine_cls=engine_cls)
    key = with_api_key(cfg).llm.api_key
    deadline = time.monotonic() + settle_s
    seen: set[str] = set()
    streak = 0
    while True:  # several replicas: require the new hash on several answers in a row
        try:
            h = served_hash(url, key)
        except OSError:
            h = ""
        seen.add(h)
        streak = streak + 1 if h == want else 0
        if streak >= 3 * max(1, cfg.scaling.max_replicas):
            return want
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {url} still reports {sorted(seen)} instead of {want}")
        time.sleep(0.2)


def show(model_hash: str, cfg) -> None:
    print(json.dumps({"app": cfg.app_name, "model": cfg.model, "hash": model_hash}), flush=True)


def main(argv: list[str] | None = None) -> int:
    def join_and_promote(cfg) -> str:  # promote joins the running cluster, never starts one
        return promote(dataclasses.replace(cfg, detach=True, ray_address=cfg.ray_address or "auto"))

    return run_job("promote", __doc__, argv, ServeJobConfig, join_and_promote, show=show,
                   errors=(ValueError, TimeoutError, RuntimeError), flags=(MODEL_FLAG,))


if __name__ == "__main__":
    sys.exit(main())

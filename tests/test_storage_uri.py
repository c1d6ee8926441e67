"""Object-store run storage for real: a moto S3 server on loopback (real HTTP, pyarrow's S3FileSystem, Ray Train's
own storage handling), a tiny pretrain and a rejection-sampling pass with ``s3://`` storage — every artifact in the
bucket, nothing only on local disk, and each resumed from the bucket after its local staging copy is deleted.

pyarrow 26 and Ray Train read the endpoint from ``AWS_ENDPOINT_URL`` (set here before Ray starts, so every worker
inherits it); the ``?endpoint_override=…&scheme=http`` form of the URI is exercised too. The multi-node probe
(``check_shared``) runs on a 2-node ``ray.cluster_utils.Cluster`` whose second raylet is given a dead endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest

from cluster.storage import RunStore, check_shared, storage_dir
from core.config import ConfigError, load_config
from training.metrics import parse_csv
from test_pretrain import make_corpus, overrides
from test_rejection_sampling import make_policy

pytestmark = pytest.mark.timeout(600)

BUCKET = "bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; AWS_* variables and $LLAMARAY_STAGING set for this module (and its Ray)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "LLAMARAY_STAGING": str(tmp_path_factory.mktemp("staging"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield {"port": port, "fs": fs, "staging": Path(env["LLAMARAY_STAGING"])}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def keys(s3, prefix: str) -> dict[str, int]:
    """Object key (under ``prefix``) → size."""
    import pyarrow.fs as pafs

    infos = s3["fs"].get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path[len(BUCKET) + len(prefix) + 2:]: i.size for i in infos if i.is_file}


def read(s3, key: str) -> str:
    with s3["fs"].open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read().decode()


def only_local(store: RunStore, stored: dict[str, int]) -> list[str]:
    """Files of the staging copy that the bucket lacks (or holds with another size)."""
    return sorted(rel for p in store.local.rglob("*") if p.is_file()
                  and stored.get(rel := p.relative_to(store.local).as_posix()) != p.stat().st_size)


# ------------------------------------------------------------------------------------------------ units


def test_settings_name_paths_and_uris(tmp_path):
    from jobs.trainer import RunSettings

    local = RunStore.open(tmp_path, "exp")
    assert local == RunStore(tmp_path / "exp") and local.location("hf") == str(tmp_path / "exp" / "hf")
    assert local.ray_storage_path() == str(tmp_path)
    assert RunStore.open(f"file://{tmp_path}", "exp") == local
    local.upload()  # a path is the storage itself: nothing to move
    local.download("data")

    q = "?endpoint_override=127.0.0.1:9000&scheme=http"
    st = RunStore.open(f"s3://b/runs/{q}", "exp")
    assert st.uri == f"s3://b/runs/exp{q}" and st.location("hf") == f"s3://b/runs/exp/hf{q}"
    assert st.ray_storage_path() == f"s3://b/runs{q}"
    assert st.location_of(st.local / "metrics" / "report.md") == f"s3://b/runs/exp/metrics/report.md{q}"
    assert st.location_of("/elsewhere/tok") == "/elsewhere/tok"

    for bad, message in (("foo://x/y", "unknown storage scheme 'foo://'"), ("s3:///runs", "no bucket")):
        with pytest.raises(ConfigError, match=message):
            RunSettings(storage=bad)
    with pytest.raises(ConfigError, match="llamaray rs-rounds .* takes a path, not a s3:// URI"):
        storage_dir("s3://b/runs", "out", job="rs-rounds")
    from jobs.serve import check_model_dir

    with pytest.raises(ConfigError, match="llamaray serve .* mount the bucket"):
        check_model_dir("s3://b/runs/exp/hf")


def test_upload_download_copy_only_what_changed(s3, monkeypatch):
    # the query form of the URI, with no endpoint in the environment
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    st = RunStore.open(f"s3://{BUCKET}/unit?endpoint_override=127.0.0.1:{s3['port']}&scheme=http", "sync")
    (st.local / "data" / "train").mkdir(parents=True)
    for i in range(3):
        (st.local / "data" / "train" / f"part-{i:05d}.parquet").write_text("x" * (i + 1))
    (st.local / "data" / ".part-9.tmp").write_text("half-written")  # temporary files never travel
    (st.local / "config.json").write_text("{}")
    st.upload("data", st.local / "config.json", "/not/in/the/run")
    assert keys(s3, "unit/sync") == {"config.json": 2, **{f"data/train/part-{i:05d}.parquet": i + 1
                                                          for i in range(3)}}
    assert st.files("data/train") == [st.location(f"data/train/part-{i:05d}.parquet") for i in range(3)]
    assert st.read_text("config.json") == "{}" and st.read_text("nope.json") is None

    stamp = (st.local / "config.json").stat().st_mtime_ns
    s3["fs"].delete_file(f"{BUCKET}/unit/sync/data/train/part-00000.parquet")
    st.upload()  # in sync (same size and mtime) except the deleted object
    assert "data/train/part-00000.parquet" in keys(s3, "unit/sync")
    assert (st.local / "config.json").stat().st_mtime_ns == stamp

    with s3["fs"].open_output_stream(f"{BUCKET}/unit/sync/data/train/part-00001.parquet") as f:
        f.write(b"changed elsewhere")
    (st.local / "data" / "train" / "part-00002.parquet").unlink()
    st.download("data")
    assert (st.local / "data" / "train" / "part-00001.parquet").read_text() == "changed elsewhere"
    assert (st.local / "data" / "train" / "part-00002.parquet").read_text() == "xxx"
    assert [p.name for p in st.local.rglob("*.tmp")] == [".part-9.tmp"]  # downloads leave no temporary file


def test_check_shared_probes_the_bucket_from_every_node(s3):
    """Good bucket: passes on 2 nodes, leaves no marker. Missing bucket: refused at once. A node whose environment
    points at a dead endpoint: refused, naming it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        blind = cluster.add_node(num_cpus=1, env_vars={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                                                       "AWS_MAX_ATTEMPTS": "1"})
        ray.init(address=cluster.address)
        with pytest.raises(ConfigError, match=r"not reachable from 1 of the cluster's 2 nodes \(node ids "
                                              + blind.node_id[:12]):
            check_shared(f"s3://{BUCKET}/probe", "run.storage")
        cluster.remove_node(blind)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        check_shared(f"s3://{BUCKET}/probe", "run.storage")
        assert keys(s3, "probe") == {}
        with pytest.raises(ConfigError, match="cannot write there from this node .* Check that the bucket exists"):
            check_shared("s3://no-such-bucket/runs", "run.storage")
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------ jobs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "story.txt", docs=100)


def test_pretrain_on_s3_keeps_everything_in_the_bucket_and_resumes_from_it(s3, corpus):
    from jobs.pretrain import PretrainConfig, pretrain

    args = overrides(corpus, f"s3://{BUCKET}/runs", "exp", **{"train.max_steps": 20, "scaling.num_workers": 2})
    out = pretrain(load_config(PretrainConfig, "tiny", args))
    assert out["run_dir"] == f"s3://{BUCKET}/runs/exp" and out["export"] == f"s3://{BUCKET}/runs/exp/hf"
    assert out["checkpoint"].startswith(f"s3://{BUCKET}/runs/exp/checkpoint_")
    stored = keys(s3, "runs/exp")
    for key in ("config.json", "data/DONE", "data/stats.json", "data/tokenizer/tokenizer.model",
                "data/train/part-00000.parquet", "data/val/part-00000.parquet", "metrics/metrics.csv",
                "metrics/report.md", "metrics/report.json", "metrics/loss.png", "metrics/eval.jsonl",
                "hf/config.json", "hf/model.safetensors", "hf/tokenizer.model"):
        assert key in stored, (key, sorted(stored))
    assert any(k.startswith("metrics/events.out.tfevents.") for k in stored)
    assert any(k.startswith("metrics/attempt-") for k in stored)
    assert len({k.split("/")[0] for k in stored if k.startswith("checkpoint_2")}) == 2  # run.keep_checkpoints
    store = RunStore.open(f"s3://{BUCKET}/runs", "exp")
    assert only_local(store, stored) == []  # nothing exists only on local disk
    assert [int(r["step"]) for r in parse_csv(read(s3, "runs/exp/metrics/metrics.csv"))] == list(range(1, 21))

    shutil.rmtree(s3["staging"])  # a fresh disk: data, metrics and the checkpoint must come back from the bucket
    out = pretrain(load_config(PretrainConfig, "tiny", args + ["train.max_steps=24"]))
    assert out["metrics"]["step"] == 24
    stored = keys(s3, "runs/exp")
    tries = [json.loads(read(s3, f"runs/exp/{k}")) for k in sorted(stored) if k.startswith("metrics/attempt-")]
    assert [t["resumed_from_step"] for t in tries] == [None, 20]
    rows = parse_csv(read(s3, "runs/exp/metrics/metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))  # the stored CSV came back and continued
    assert json.loads(read(s3, "runs/exp/metrics/report.json"))["last_step"] == 24
    assert only_local(store, stored) == []


def test_bad_storage_is_refused_before_any_worker(s3, corpus, capsys):
    from jobs.pretrain import main

    for storage, message in (("foo://bucket/runs", "unknown storage scheme 'foo://'"),
                             ("s3://no-such-bucket/runs", "cannot write there from this node")):
        args = overrides(corpus, storage, "bad")
        assert main(["--config", "tiny"] + [a for kv in args for a in ("--set", kv)]) == 2
        assert message in capsys.readouterr().err
    assert keys(s3, "runs/bad") == {}


@pytest.fixture(scope="module")
def rs_setup(tmp_path_factory):
    from tasks.arithmetic import problems

    d = tmp_path_factory.mktemp("rs")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems(12, seed=7)))
    return d, make_policy(d), prompts


def test_rejection_sampling_on_s3_writes_the_bucket_and_resumes_from_it(s3, rs_setup):
    from jobs.rejection_sampling import RSConfig, run

    d, model_dir, prompts = rs_setup
    over = [f"model={model_dir}", f"out=s3://{BUCKET}/rs/round1",
            f"sources=[{{path: {prompts}, scorer: {{kind: numeric}}}}]", "n=2", "max_tokens=8", "temperature=1.0",
            "pool.engine=reference", "pool.batch_size=4", "pool.num_cpus=1",
            "selection.sft_threshold=1.0", "selection.dpo_margin=1.0"]
    first = run(load_config(RSConfig, None, over), progress=False)
    stored = keys(s3, "rs/round1")
    shards = sorted(k for k in stored if k.startswith("shards/"))
    assert len(shards) == 3 and [f"shards/{s}" for s in first["shards"]] == shards
    for key in ("config.json", "sft.jsonl", "dpo.jsonl", "failed.jsonl", "manifest.json", "metrics.csv"):
        assert key in stored, (key, sorted(stored))
    assert json.loads(read(s3, "rs/round1/manifest.json"))["prompts"] == 12
    assert only_local(RunStore.open(f"s3://{BUCKET}/rs/round1"), stored) == []

    shutil.rmtree(s3["staging"])  # a fresh disk, and one shard lost: only its prompts are sampled again
    s3["fs"].delete_file(f"{BUCKET}/rs/round1/{shards[0]}")
    again = run(load_config(RSConfig, None, over), progress=False)
    import pyarrow.parquet as pq

    ids = []
    for k in sorted(k for k in keys(s3, "rs/round1") if k.startswith("shards/")):
        ids += sorted(set(pq.read_table(f"{BUCKET}/rs/round1/{k}", filesystem=s3["fs"],
                                        columns=["prompt_id"]).column("prompt_id").to_pylist()))
    assert len(ids) == len(set(ids)) == 12  # every prompt exactly once
    assert again["prompts"] == 12 and len(again["shards"]) == 3


def test_sft_on_s3_workers_read_their_inputs_from_the_bucket(s3, rs_setup, tmp_path):
    """The rendered rows and config reach the bucket from the driver; the workers stage them from there; metrics,
    the checkpoint and the merged export land in the bucket. ``init`` itself must be a path (a URI is refused)."""
    from jobs.sft import SftConfig, sft
    from training.sft_data import write_jsonl
    from tasks.arithmetic import problems, sft_row

    _, model_dir, _ = rs_setup
    rows = write_jsonl([sft_row(p) for p in problems(40, seed=1, digits=1, ops="+")], tmp_path / "train.jsonl")
    over = [f"init={model_dir}", f"data.train={rows}", "train.max_steps=4", "train.batch_size=4",
            "train.micro_batch_size=2", "train.warmup_steps=1", "run.eval_every=2", "run.ckpt_every=2",
            "run.progress=false", "eval.metric=none", f"run.storage=s3://{BUCKET}/sft", "run.name=ft"]
    out = sft(load_config(SftConfig, "sft-tiny", over))
    assert out["run_dir"] == f"s3://{BUCKET}/sft/ft" and out["export"] == f"s3://{BUCKET}/sft/ft/hf"
    stored = keys(s3, "sft/ft")
    for key in ("config.json", "data/train.parquet", "data/val.parquet", "data/stats.json", "metrics/metrics.csv",
                "metrics/report.md", "metrics/eval.jsonl", "hf/model.safetensors", "hf/config.json"):
        assert key in stored, (key, sorted(stored))
    assert any(k.startswith("checkpoint_2") for k in stored)
    assert only_local(RunStore.open(f"s3://{BUCKET}/sft", "ft"), stored) == []
    assert [int(r["step"]) for r in parse_csv(read(s3, "sft/ft/metrics/metrics.csv"))] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="init='s3://.*llamaray sft .* takes a path"):
        load_config(SftConfig, "sft-tiny", over + [f"init=s3://{BUCKET}/sft/ft/hf"])

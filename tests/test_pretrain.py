"""The pretrain job end to end on CPU: 2 Ray Train workers (gloo, FSDP2), a small generated corpus.

One trained run is shared by most tests (module fixture); it is also the worker-kill run: the last worker SIGKILLs
itself once before step 15 (tests/faults.kill_before_step_15, a step callback), after the step-10 checkpoint, and Ray
Train restarts the group from it.
A second run is started as a subprocess, its driver killed after the first checkpoint, and rerun with ONE worker.
Both record the rows every worker trains on (tests/faults.record_consumed) and cross an epoch boundary of the streamed
training split: the data position must resume exactly (``assert_data_exact``).
What only a GPU exercises (NCCL, bf16, torch.compile, the compiled fused loss): bench/pretrain_mfu.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.metrics import read_csv
from jobs.pretrain import PretrainConfig, main, pretrain
from core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
KILL, RECORD = "tests.faults:kill_before_step_15", "tests.faults:record_consumed"  # step callbacks (tests/faults.py)
pytestmark = pytest.mark.timeout(900)


def make_corpus(path: Path, docs: int = 400) -> Path:
    r = random.Random(0)
    names, verbs = ["alice", "bob", "carol", "dave", "erin", "frank"], ["sees", "likes", "helps", "calls", "meets"]
    objs, places = ["the cat", "a dog", "the red ball", "an old book", "the tall tree"], ["park", "house", "garden"]
    text = "\n\n".join(" ".join(f"{r.choice(names)} {r.choice(verbs)} {r.choice(objs)} in the {r.choice(places)}."
                                for _ in range(r.randint(4, 10))) for _ in range(docs))
    path.write_text(text)
    return path


def overrides(corpus: Path, storage: Path, name: str, **extra) -> list[str]:
    base = {"data.sources": f"[{{path: {corpus}}}]", "data.seq_len": 32, "data.rows_per_shard": 64,
            "model.dim": 128, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
            "model.intermediate_size": 256, "model.vocab_size": 512, "model.max_seq_len": 128,
            "train.max_steps": 30, "train.batch_size": 8, "train.micro_batch_size": 4, "train.warmup_steps": 3,
            "run.ckpt_every": 10, "run.eval_every": 10, "run.storage": str(storage), "run.name": name,
            "run.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def attempts(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "metrics").glob("attempt-*.json"))]


def assert_data_exact(run: Path, batch_size: int, steps: int) -> dict[int, list[int]]:
    """Rows per epoch of the final timeline — each step as trained by the last worker group that ran it (a restarted
    group replays the steps after its checkpoint) — checked: every step trains on batch_size rows, no row twice in an
    epoch, and every completed epoch misses fewer than one step's worth (+ the N mod workers rows that Ray's equal
    split leaves out)."""
    num_rows = json.loads((run / "data" / "stats.json").read_text())["train_sequences"]
    records = [json.loads(ln) for p in (run / "metrics").glob("consumed-*.jsonl") for ln in p.read_text().splitlines()]
    by_step: dict[int, list[dict]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(1, steps + 1))
    epochs: dict[int, list[int]] = {}
    for step in sorted(by_step):
        last = max(r["attempt"] for r in by_step[step])
        rs = [r for r in by_step[step] if r["attempt"] == last]
        assert sorted(r["rank"] for r in rs) == list(range(rs[0]["world"])), (step, rs)
        assert len({r["epoch"] for r in rs}) == 1
        epochs.setdefault(rs[0]["epoch"], []).extend(i for r in rs for i in r["idx"])
        assert sum(len(r["idx"]) for r in rs) == batch_size
    assert sorted(epochs) == list(range(len(epochs)))
    worlds = max(r["world"] for r in records)
    for e, idx in epochs.items():
        assert len(idx) == len(set(idx)), f"epoch {e}: a row trained on twice"
        assert set(idx) <= set(range(num_rows))
        if e < max(epochs):
            assert num_rows - len(idx) < batch_size + worlds, f"epoch {e}: {num_rows - len(idx)} rows skipped"
    return epochs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "story.txt", docs=100)  # ~180 rows: runs cross epochs


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(PretrainConfig, "tiny", overrides(corpus, storage, "shared", **{
        "run.callbacks": f"[{KILL}, {RECORD}]"}))
    out = pretrain(cfg)
    return cfg, Path(out["run_dir"]), out


def test_loss_falls_well_below_unigram_entropy(trained):
    from corpus.pipeline import unigram_entropy

    _, run, out = trained
    h = unigram_entropy(run / "data" / "train")
    rows = read_csv(run / "metrics" / "metrics.csv")
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert float(rows[0]["loss"]) > h  # starts above: the test is not trivially passed
    assert val[-1] < 0.75 * h, (val, h)


def test_fsdp_shards_parameters_across_two_workers(trained):
    _, run, _ = trained
    first = attempts(run)[0]
    assert first["world_size"] == 2
    full = first["full_param_elements"]
    for local in first["local_param_elements"]:
        assert 0.45 * full <= local <= 0.55 * full


def test_killed_worker_resumes_from_checkpoint_with_continuous_steps(trained):
    cfg, run, out = trained
    assert (run / "metrics" / "killed-at-15").exists()
    tries = attempts(run)
    assert [t["resumed_from_step"] for t in tries] == [None, 10]
    assert tries[1]["consumed"] == 10 * cfg.train.batch_size  # the data position came back with the weights
    rows = read_csv(run / "metrics" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [int(r["consumed"]) for r in rows] == [s * cfg.train.batch_size for s in range(1, 31)]
    assert out["metrics"]["step"] == 30
    epochs = assert_data_exact(run, cfg.train.batch_size, 30)
    assert len(epochs) >= 2, "the run must complete an epoch after the kill"


def test_metrics_tensorboard_and_report(trained):
    _, run, _ = trained
    m = run / "metrics"
    assert list(m.glob("events.out.tfevents.*"))
    assert (m / "loss.png").stat().st_size > 1000
    report = json.loads((m / "report.json").read_text())
    assert report["last_step"] == 30 and report["final_val_ppl"] > 1
    rows = read_csv(m / "metrics.csv")
    assert all(float(r["tokens_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    assert len(list(run.glob("checkpoint_2*"))) == 2  # run.keep_checkpoints


def test_export_loads_in_vllm_and_generates(trained):
    _, run, out = trained
    code = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, seed=0, max_model_len=128)\n"
        "    o = llm.generate(['alice sees'], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)\n"
        "    print('RESULT ' + json.dumps(o[0].outputs[0].text))\n")
    r = subprocess.run([sys.executable, "-c", code, out["export"]], capture_output=True, text=True, timeout=400,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stderr[-3000:]
    text = json.loads(line[0][7:])
    words = set(text.replace(".", " ").split())
    assert words & {"the", "in", "park", "house", "garden", "cat", "dog", "ball", "book", "tree"}, text


def test_killed_driver_rerun_resumes_on_one_worker(corpus, tmp_path):
    args = overrides(corpus, tmp_path, "driver", **{"train.max_steps": 30, "run.ckpt_every": 5, "run.export": False,
                                                    "run.callbacks": f"[{RECORD}]"})
    cmd = [sys.executable, "-m", "jobs.pretrain", "--config", "tiny"] + [a for kv in args for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "driver"
    deadline = time.time() + 400
    try:
        # a checkpoint counts once Ray's checkpoint manager has recorded it (its snapshot file), not when its
        # directory appears: that is the state a new driver restores from
        while not (run / "checkpoint_manager_snapshot.json").exists() and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    rows = read_csv(run / "metrics" / "metrics.csv")
    killed_at = int(rows[-1]["step"])
    assert 5 <= killed_at < 30, "the driver must die mid-run"

    cfg = load_config(PretrainConfig, "tiny", args + ["scaling.num_workers=1"])
    out = pretrain(cfg)
    tries = attempts(run)
    assert tries[-1]["world_size"] == 1 and tries[-1]["resumed_from_step"] >= 5
    assert tries[-1]["consumed"] == tries[-1]["resumed_from_step"] * cfg.train.batch_size
    rows = read_csv(run / "metrics" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert rows[-1]["world_size"] == "1" and out["metrics"]["step"] == 30
    assert len(assert_data_exact(run, cfg.train.batch_size, 30)) >= 2  # 2 workers, then 1, across an epoch


@pytest.mark.parametrize("case,extra,message", [
    ("empty", {}, "the corpus is empty"),
    ("missing", {"data.sources": "[{path: /nonexistent/corpus.txt}]"}, "does not exist"),
    ("seq_len", {"data.seq_len": 256}, "data.seq_len=256 is above the model's context"),
    ("gpus", {"scaling.use_gpu": True, "scaling.num_workers": 2}, "2 GPU worker(s) asked for"),
])
def test_bad_input_fails_before_any_worker(case, extra, message, corpus, tmp_path, capsys):
    src = corpus
    if case == "empty":
        src = tmp_path / "empty.txt"
        src.write_text("")
    args = overrides(src, tmp_path, "bad", **extra)
    assert main(["--config", "tiny"] + [a for kv in args for a in ("--set", kv)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics").exists() and not list(tmp_path.glob("bad/checkpoint_2*"))

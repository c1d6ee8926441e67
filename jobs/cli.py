"""``llamaray <job> …``: one sub-command per job; each is also ``python -m jobs.<module> …``."""

from __future__ import annotations

import importlib
import sys

# sub-command → module in jobs/ (each module has ``main(argv) -> int``).
JOBS: dict[str, tuple[str, str]] = {
    "tokenizer": ("jobs.tokenizer", "train a SentencePiece BPE tokenizer on text files"),
    "export": ("jobs.export", "write a checkpoint as a Hugging Face Llama directory"),
    "import": ("jobs.import_model", "import an HF Llama directory or a GGUF file into a llamaray checkpoint"),
    "generate": ("jobs.generate", "sample from a checkpoint with the reference sampler"),
    "pretrain": ("jobs.pretrain", "pretrain with FSDP2 on Ray Train (checkpoints, resume, metrics, HF export)"),
    "sft": ("jobs.sft", "supervised fine-tuning, full or LoRA, on the FSDP2 trainer (task metric, HF/adapter export)"),
    "dpo": ("jobs.dpo", "direct preference optimisation, full or LoRA, against the starting weights as reference"),
    "rm": ("jobs.rm", "train a Bradley-Terry reward model on preference pairs (export for the reward_model scorer)"),
    "serve": ("jobs.serve", "serve an HF checkpoint over an OpenAI-compatible HTTP API (Ray Serve)"),
    "promote": ("jobs.promote", "roll a new checkpoint into the running Serve application, dropping no request"),
    "clean": ("jobs.clean", "clean, dedup, tokenize and pack a corpus (Ray Data)"),
    "rs": ("jobs.rejection_sampling", "rejection sampling: K candidates per prompt, scored, best kept (exactly once)"),
    "rs-rounds": ("jobs.rs_rounds", "rounds of RS → SFT with new weights in the live rollout actors"),
    "grpo": ("jobs.grpo", "online RL: GRPO on the rollout actors and the trainer, weights synced in memory"),
    "pipeline": ("jobs.pipeline", "the whole lifecycle: pretrain → SFT → RS rounds → DPO, with a summary"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, JOBS))
        print("usage: llamaray <job> [--config FILE] [--set key=value …]\n\njobs:")
        for name, (_, doc) in JOBS.items():
            print(f"  {name:<{width}}  {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"llamaray: unknown job {name!r}; known: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The training machinery in plain PyTorch: the FSDP2 loop (loop.py), its objectives (objectives/), row sources
(data_stream.py, sft_data.py), sharding (parallel.py), checkpoints (checkpointing.py), metrics (metrics.py) and the
devices' peak FLOP/s (flops.py). Never imports Ray: jobs/trainer.py runs it on Ray Train."""

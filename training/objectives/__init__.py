"""What pretraining, SFT and DPO plug into training/loop.run_worker (the ``Objective`` protocol there): one module
each (pretrain.py, sft.py, dpo.py); what SFT and DPO share — starting weights, LoRA, the task metric, the merged
export — is finetune.py."""

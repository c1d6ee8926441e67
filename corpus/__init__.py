"""The pretraining data room: sources → clean → dedup → tokenize → pack (Ray Data), and the embedded default corpus.

``corpus.config`` (DataConfig and friends), ``corpus.clean`` (plain-Python filters and dedup indexes),
``corpus.pipeline`` (prepare / ensure_tokenizer / load_split / unigram_entropy), ``corpus.make_default`` (the script
that generates corpus/default/), ``corpus.learnability`` (a quick single-process check that a prepared corpus is
learnable). The one package outside jobs/ allowed to import ray (ray.data only, never ray.init).
"""

"""The paper's toy model (Sec. 5, App. F): a cyclic next-token task, a 2-layer 4-head transformer with
last-token pooling, the chain Baseline -> RoPE -> Muon -> Untied, Fourier probes, and the tuned batch
sweep that runs through the shared replication pipeline (``python -m examples.toy --preset cpu``).

Modules: ``task`` (the data), ``model`` (the transformer), ``train`` (families, optimizers,
schedule, checkpoints), ``probes`` (Fourier probes), ``measure`` (the library's measurements),
``presets`` (smoke / cpu / full), ``workload`` (the pipeline's Workload), ``report`` (figures and the
paper table). ``theory.py`` holds the theorem checks.
"""

"""The online-training core shared by `ppo` and `sppo`: rollout → score → (advantages → update, in the trainer).

`rollout.py` samples K completions per prompt (`generation.generate`, or a vLLM engine) and lays them out as
one padded batch, then fills in the per-token log-probs of the policy and the reference and the critic's
values, each from ONE teacher-forced forward. `score.py` hands completions to any `Scorer` of `rewards.py`;
no reward code lives in a loop. `ranks.py`: data parallelism and FSDP2 sharding for the loops;
`selfplay.py`: SPPO's P̂, kept pairs and LC win rate. Layout and conventions: docs/algorithms/ppo.md, sppo.md.
"""

"""The online-training core: rollout → score → (advantages → update, in the trainer).

`rollout.py` samples K completions per prompt from the current policy (`generation.generate`
underneath) and lays them out as one padded batch, then fills in the per-token log-probs of the
policy and the reference and the critic's values, each from ONE teacher-forced forward.
`score.py` hands the completions to any `Scorer` of `rewards.py`; no reward code lives in the loop.
The trainers (`trainers/ppo.py`) compute advantages and update with the pure functions of
`alignkit.rl_losses`. Layout and conventions: docs/algorithms/ppo.md.
"""

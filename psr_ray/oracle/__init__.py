"""The step oracle: labels a candidate step right or wrong for a problem with a reference answer, for
initialization data (EFT) and measurement only, never for the search's own judge (except the labelled
`judge.mode: oracle` ablation).

- `exact.py`: an exact check where the task allows one (the built-in arithmetic task, `data/arith.py`).
- `rollouts.py`: Monte-Carlo rollouts through the rollout engines (Math-Shepherd): the share of k sampled
  completions from prefix + step that reach the reference answer.
- `judge.py`: oracle verdicts for judge requests (the ablation) and labels for a step's candidates.
- `precision.py`: pair precision of a set of step pairs and the same statistic for a random pick.
"""

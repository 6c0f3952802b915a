"""The self-judged step search: one problem's state machine (`problem.py`, scored by `scoring.py`), the
scheduler that drives many problems over the rollout and judge engine pools (`scheduler.py`), and one search
pass that writes the step pairs (`generate.py`)."""

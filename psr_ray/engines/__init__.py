"""The vLLM engines: the actor (`actor.py`), what it is asked and answers (`api.py`), and pools of named
engine actors of one role with their call accounting (`pool.py`)."""

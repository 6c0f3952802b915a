"""Initialization data (paper section 3.2): IFT (step-formatted solutions) and EFT (pairwise step judgments)
built from worked solutions and the model's own candidates, and labelled step pairs (`labelled.py`). The init
stage that trains M0 into M1 on them is `psr_ray.pipeline.init_stage`."""

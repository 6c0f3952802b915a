"""Initialization data (paper section 3.2): IFT (step-formatted solutions) and EFT (pairwise step judgments)
built offline from worked solutions, labelled step pairs (`labelled.py`), and `initialize`, the SFT of M0
into M1 (`psr-ray init`)."""

from psr_ray.init_data.run import InitResult, initialize

__all__ = ["InitResult", "initialize"]

"""Initialization data (paper section 3.2): IFT (step-formatted solutions) and EFT (pairwise step judgments)
built offline from worked solutions, and `run_init`, the SFT of M0 into M1 (`psr-ray init`)."""

from psr_ray.init_data.run import InitResult, run_init

__all__ = ["InitResult", "run_init"]

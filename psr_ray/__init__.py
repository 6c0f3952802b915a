"""psr_ray: Process-based Self-Rewarding (arXiv 2503.03746) on Ray.

Importing the package is cheap on purpose: Ray, vLLM, DeepSpeed and torch are imported only inside the
modules and actors that use them.
"""

__version__ = "0.1.0"

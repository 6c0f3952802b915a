"""The checkpoint's HF export folder as a transport: every engine reads the safetensors files itself.

The fallback of the loop's sync stage (stage.py): for engines that do not serve the new policy after the
trainer's push (a resumed run, an engine restarted after the push, a failed push). The same transaction and
the same probe as every other transport; the reference is computed from the export's tensors, which are
what the trainer's rank 0 gathered and wrote.
"""

from __future__ import annotations

from typing import Any

from psr_ray.weight_sync.base import Sender, call_engines
from psr_ray.weight_sync.plan import TensorMeta


class ExportSender(Sender):
    backend = "export"

    def __init__(self, engines: list[Any], *, folder: str, **kwargs: Any):
        super().__init__(engines, **kwargs)
        self.folder = folder

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        call_engines(self.engines, "load_folder", self.folder, timeout_s=self.timeout_s)

"""An engine's weight-update state: which calls it may serve while its weights change. Pure.

An update's first call finishes the requests already in the engine (drain, engines/batching.py). From
`begin` to `commit`/`restored` the engine's layers are on the meta device, half new, or new but not yet
verified against the trainer: every generation call in that window is refused with an error naming the
engine (gate), never served from those weights. An engine whose failed update could not be
undone is BROKEN: it serves nothing until a whole update succeeds.

    SERVING --begin--> LOADING --loaded--> LOADED --commit--> SERVING (new policy version)
    LOADING / LOADED --restored--> SERVING (old policy version)      --broke--> BROKEN --begin--> LOADING
    SERVING --sleep--> ASLEEP --wake--> SERVING           (colocated engines, while the trainer trains)
"""

from __future__ import annotations

import enum


class UpdateState(enum.StrEnum):
    SERVING = "serving"
    LOADING = "loading"  # layers on meta or half loaded
    LOADED = "loaded"  # new weights in, awaiting the trainer's verdict
    BROKEN = "broken"  # a failed update could not be undone
    ASLEEP = "asleep"  # colocated: weights offloaded while the trainer uses the GPU


class EngineUpdatingError(RuntimeError):
    """A generation call reached an engine that is between weight versions."""


class UpdateGate:
    def __init__(self, engine: str, policy_version: int):
        self.engine = engine
        self.policy_version = policy_version
        self.state = UpdateState.SERVING
        self.pending_version: int | None = None
        self.reason = ""

    def check_serving(self) -> None:
        """Raises unless the engine serves a whole, verified policy."""
        if self.state is UpdateState.SERVING:
            return
        if self.state is UpdateState.BROKEN:
            raise EngineUpdatingError(f"engine {self.engine} serves no policy: {self.reason}")
        if self.state is UpdateState.ASLEEP:
            raise EngineUpdatingError(f"engine {self.engine} is asleep (colocated: the trainer holds its GPU); "
                                      "wake it first")  # fmt: skip
        raise EngineUpdatingError(
            f"engine {self.engine} is {self.state.value} weights (policy {self.policy_version} -> "
            f"{self.pending_version}); no generation until the update commits or rolls back"
        )

    def begin(self, policy_version: int) -> None:
        if self.state in (UpdateState.LOADING, UpdateState.LOADED, UpdateState.ASLEEP):
            raise EngineUpdatingError(
                f"engine {self.engine} is {self.state.value} (policy {self.pending_version or self.policy_version}); "
                "roll that update back or wake it first"
            )
        self.state = UpdateState.LOADING
        self.pending_version = policy_version

    def require(self, state: UpdateState, action: str) -> None:
        if self.state is not state:
            raise EngineUpdatingError(f"engine {self.engine}: cannot {action} while {self.state.value}")

    def loaded(self) -> None:
        self.require(UpdateState.LOADING, "finish loading")
        self.state = UpdateState.LOADED

    def commit(self) -> int:
        self.require(UpdateState.LOADED, "commit an update")
        assert self.pending_version is not None
        self.policy_version, self.pending_version = self.pending_version, None
        self.state = UpdateState.SERVING
        self.reason = ""
        return self.policy_version

    def restored(self) -> None:
        """The old weights are back: serve the old version again."""
        self.state = UpdateState.SERVING
        self.pending_version = None
        self.reason = ""

    def sleep(self) -> None:
        self.require(UpdateState.SERVING, "sleep")
        self.state = UpdateState.ASLEEP

    def wake(self) -> None:
        self.require(UpdateState.ASLEEP, "wake up")
        self.state = UpdateState.SERVING

    def broke(self, reason: str) -> None:
        self.state = UpdateState.BROKEN
        self.pending_version = None
        self.reason = reason

    @property
    def in_update(self) -> bool:
        return self.state in (UpdateState.LOADING, UpdateState.LOADED)

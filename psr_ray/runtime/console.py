"""What a person sees on the console: one progress display per stage and a summary per iteration.

Quiet (the default): what Ray's workers print (vLLM engines, trainer workers and their per-step reports,
Ray Data's progress lines) stays in the Ray session's log files instead of being forwarded to the driver
(`log_to_driver=False`); the driver's own Ray Data progress bars and INFO lines go to Ray Data's log file; the
logs folder is printed once. `--verbose` (`configure(verbose=True)`) keeps Ray's default forwarding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Ray Data's loggers write to <session>/logs/ray-data/ray-data.log only (its default adds the console).
RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters: {ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}}
handlers: {file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}}
loggers: {ray.data: {level: DEBUG, handlers: [file], propagate: false}}
"""

_settings = {"verbose": False}


def configure(*, verbose: bool) -> None:
    """Chooses quiet (the default) or verbose output for this process; call before Ray starts."""
    _settings["verbose"] = verbose
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banner; the run folder is printed by the loop


def is_verbose() -> bool:
    return _settings["verbose"]


def ray_init_kwargs(*, local: bool) -> dict[str, Any]:
    """Environment and `ray.init` arguments for the chosen console; call right before `ray.init`. A local
    cluster inherits the environment, so its workers' Ray Data logs go to files too."""
    if is_verbose():
        return {}
    path = Path(tempfile.gettempdir()) / "psr_ray_ray_data_logging.yaml"
    if not path.is_file() or path.read_text() != RAY_DATA_LOGGING:
        # Written aside, then renamed: another run starting on this machine may be reading it.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(RAY_DATA_LOGGING)
        os.replace(tmp, path)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(path))
    if local:
        # Ray 2.60 turns token auth on for a new local cluster and says so in a warning; auth stays on. (Setting
        # RAY_AUTH_MODE here instead would come too late: Ray reads it when it is imported.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return {"log_to_driver": False}


@contextlib.contextmanager
def ray_notices_to_log(log: logging.Logger) -> Iterator[None]:
    """For a short command that joins a running cluster (`psr-ray scale`): what Ray's error listener prints on
    the driver meanwhile (node-wide notices such as the raylet's "N worker processes have been started" about
    the run's own workers, which Ray 2.60 writes to stdout, not stderr) goes to `log` at debug level instead of
    under the command's one line."""
    import io

    caught = io.StringIO()
    try:
        with contextlib.redirect_stderr(caught), contextlib.redirect_stdout(caught):
            yield
    finally:
        for line in caught.getvalue().splitlines():
            log.debug("ray: %s", line)


def after_ray_init() -> None:
    """Turns off the driver's Ray Data progress bars (captured by every Trainer built after this) and prints
    where the workers' logs are."""
    if is_verbose():
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    print(f"[psr_ray] engine, trainer and Ray Data logs: {ray_logs_dir()} (--verbose prints them here)", flush=True)


def ray_logs_dir() -> str:
    """The Ray session's logs folder on this node (worker-*.out/err, train/, ray-data/)."""
    try:
        import ray._private.worker as ray_worker

        return ray_worker.global_worker.node.get_logs_dir_path()
    except Exception:  # a private API: a changed one must not stop a run
        return "<ray session dir>/logs"


class Stage:
    """One stage's display: on a terminal a tqdm line ticking the elapsed time (tqdm keeps it apart from the
    bars inside the stage, e.g. the search's problems), ending as `title: result [elapsed]`; elsewhere (a Ray
    job's log) just that last line."""

    def __init__(self, title: str, *, stream: Any = None):
        self.title = title
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.result = "done"
        self._bar: Any = None
        self._stop = threading.Event()
        if _is_tty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=None, desc=title, bar_format="{desc} ... {elapsed}", file=self.stream,
                             dynamic_ncols=True)  # fmt: skip
            threading.Thread(target=self._tick, name=f"psr-stage-{title}", daemon=True).start()

    def done(self, text: str) -> None:
        self.result = text

    def close(self, *, failed: bool = False) -> None:
        self._stop.set()
        line = (
            f"{self.title}: {'failed' if failed else self.result} [{format_seconds(time.monotonic() - self.started)}]"
        )
        if self._bar is not None:
            self._bar.bar_format = "{desc}"
            self._bar.set_description_str(line, refresh=False)
            self._bar.close()
        else:
            print(line, file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._bar.refresh()


@contextlib.contextmanager
def stage(title: str) -> Iterator[Stage]:
    """`with stage("iter 1/2 sync") as s: ...; s.done("policy v2")` shows the stage as one line."""
    display = Stage(title)
    try:
        yield display
    except BaseException:
        display.close(failed=True)
        raise
    display.close()


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def iteration_summary(
    iteration: int, num_iterations: int, stages: dict[str, Any], previous_rows: list[dict[str, Any]]
) -> str:
    """One line for a finished iteration from its recorded stages (run_state): pairs, training, sync,
    accuracy per benchmark with its change since the previous evaluation."""
    search, train = stages.get("search") or {}, stages.get("train") or {}
    sync, evaluation = stages.get("sync") or {}, stages.get("eval") or {}
    parts = []
    if search:
        parts.append(
            f"{search.get('pairs_total', 0)} pairs, {search.get('rollbacks', 0)} rollbacks, "
            f"{100 * search.get('unparseable_rate', 0.0):.1f}% unparseable"
        )
    if train:
        loss = (train.get("final") or {}).get("train/loss")
        parts.append(
            f"{train.get('num_optimizer_steps', 0)} steps" + (f", loss {loss:.4f}" if loss is not None else "")
        )
    if sync:
        parts.append(f"policy v{sync.get('policy_version')}")
    before = {row["benchmark"]: row["accuracy"] for row in previous_rows}
    for row in evaluation.get("rows", []):
        change = row["accuracy"] - before[row["benchmark"]] if row["benchmark"] in before else None
        delta = f" ({100 * change:+.1f})" if change is not None else ""
        parts.append(f"{row['benchmark']} {100 * row['accuracy']:.1f}%{delta}")
    label = f"iteration {iteration}/{num_iterations}" if iteration else "starting model"
    return f"== {label}: " + "; ".join(parts)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

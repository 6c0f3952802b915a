"""Job entrypoint: `python -m psr_ray --config jobs/configs/X.yaml key=value ...` (= `psr-ray run ...`).

The same line runs locally and as a Ray job (`ray job submit -- python -m psr_ray ...` or
`psr-ray submit`). Inside a submitted job Ray is already up (RAY_ADDRESS is set by the job): the driver
connects to it and leaves the job's runtime_env (working_dir, env vars) as the user set them.
"""

from __future__ import annotations

import sys

from psr_ray.app.cli import main


def entrypoint(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--help", "-h"):
        return main(["run", "--help"])
    return main(["run", *args])


if __name__ == "__main__":
    sys.exit(entrypoint())

"""Infrastructure any layer may use: Ray start-up (`cluster`), job submission (`submit`), the console
(`console`), metrics and wandb (`metrics`, `grafana`), memory sampling (`memory`), durable writes
(`durable`), bounded waits on Ray (`waits`), model resolution (`models`) and kill points (`kill_windows`).
It imports nothing of psr_ray but `core` and `config`."""

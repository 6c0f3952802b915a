"""The training pipeline: the checks before anything starts (`preflight`), the run folder and its state
(`run_dir`, `run_state`), the init stage M0 -> M1 (`init_stage`, cached by `init_cache`), the search stage
(`search_stage`), the sync stage (`sync_stage`) and the driver loop that runs them (`loop`)."""

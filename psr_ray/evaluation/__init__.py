"""Evaluation: greedy accuracy on math benchmarks (`benchmarks`), judge accuracy and pair precision
(`judging`), the results tables and plot (`tables`) and a run's results files (`run_results`)."""

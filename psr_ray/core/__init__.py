"""Pure core: the step format (`steps`), the solver and judge prompts (`prompts`), answer checking
(`verify`) and the statistics every table uses (`stats`). No Ray, vLLM or torch."""

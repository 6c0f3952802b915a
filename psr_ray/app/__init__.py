"""The `psr-ray` command line (`cli`) and its commands (`commands`), thin over the pipeline."""

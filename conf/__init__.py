"""tuning_fork's configs (the package tuning_fork.conf, shipped in the wheel): composed by Hydra, never imported for code."""

"""What tuning_fork's two sweepers share: the Optuna engine (engine.py) and the report a sweep leaves (report.py)."""

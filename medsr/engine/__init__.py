"""Runtime side: bundle, sessions, NumPy schedulers, pipeline. Never imports torch."""

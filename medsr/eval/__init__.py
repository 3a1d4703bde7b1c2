"""Evaluation: fidelity metrics, paired statistics and the parity harness."""

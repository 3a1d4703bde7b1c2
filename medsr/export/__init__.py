"""PyTorch side: models, presets, checkpoints, training and export. Imports torch; never imported by the engine."""

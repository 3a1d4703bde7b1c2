"""Training of medsr models (PyTorch): the loop and checkpoints (``loop``, ``checkpoint``), the VAE (``vae``) and
denoiser (``denoiser``) objectives, the weights file (``weights``), the default model's recipe (``recipe``) and its
held-out evaluation (``evaluate``)."""

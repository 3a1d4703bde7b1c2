"""medsr: deploy latent-diffusion super-resolution for medical images, verified against its PyTorch reference."""

__version__ = "0.1.0"

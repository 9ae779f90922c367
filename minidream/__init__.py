"""minidream: DreamBooth on Stable Diffusion 1.x in plain PyTorch."""

__version__ = "0.1.0"

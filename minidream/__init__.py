"""minidream: DreamBooth on Stable Diffusion 1.x, 2.x and XL in plain PyTorch."""

__version__ = "0.1.0"

# Loaded on first use, so that `import minidream.config` stays free of torch.
_WEIGHTS_API = ("load_pipeline", "save_pipeline", "WeightsError")


def __getattr__(name: str):
    if name in _WEIGHTS_API:
        from minidream.io import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'minidream' has no attribute {name!r}")

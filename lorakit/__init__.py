"""lorakit: parameter-efficient fine-tuning for Stable Diffusion and any PyTorch model."""

__version__ = "0.1.0"

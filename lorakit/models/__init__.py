"""Stable Diffusion models: offline configs, loading from single files or diffusers folders."""

"""Networks: adapters on whole models (presets, names, blocks, save/load, the kohya network_module)."""

from .create import create_network
from .load import load_network
from .network import Entry, Network

__all__ = ["create_network", "load_network", "Network", "Entry"]

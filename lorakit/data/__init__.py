"""Training data: kohya-style ``N_concept`` folders, dataset specs (the parsed dataset TOML), captions, buckets,
augmentation and latent caching, served as ``Batch``es in a resumable order.

Start at ``dataset.TrainDataset`` (its module doc shows the trainer's loop); ``spec`` holds the inputs,
``folders`` reads image folders and metadata files, ``latent_cache`` caches VAE latents.
"""

from .dataset import Batch, BatchOrder, SampleKey, TrainDataset, make_loader, pixel_multiple
from .errors import DatasetError
from .folders import subsets_from_folders
from .from_config import specs_from_config, specs_from_folders
from .latent_cache import cache_latents
from .spec import CaptionOptions, DatasetSpec, SubsetSpec, parse_resolution

__all__ = ["Batch", "BatchOrder", "CaptionOptions", "DatasetError", "DatasetSpec", "SampleKey", "SubsetSpec",
           "TrainDataset", "cache_latents", "make_loader", "parse_resolution", "pixel_multiple",
           "specs_from_config", "specs_from_folders", "subsets_from_folders"]

"""Re-export of ``lorakit.formats.unet_paths`` (moved there so that the single-file checkpoint converter in
``formats`` can use the U-Net path map without importing ``network``)."""

from lorakit.formats.unet_paths import (SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_to_ldm, is_ldm_path,
                                        ldm_to_diffusers, sdxl_diffusers_to_sgm, sdxl_sgm_to_diffusers)

__all__ = ["SD_LAYOUT", "SDXL_LAYOUT", "UNetLayout", "diffusers_to_ldm", "is_ldm_path", "ldm_to_diffusers",
           "sdxl_diffusers_to_sgm", "sdxl_sgm_to_diffusers"]

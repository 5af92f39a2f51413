"""Load SD1.x / SD2.x / SDXL from a single-file checkpoint (.safetensors or .ckpt, the LDM/SGM layout that
A1111 and ComfyUI use), a diffusers folder, or a bundled demo name ("demo:tiny-sd"). Offline: configs and
tokenizers ship with lorakit.

Each component is built on the meta device and filled tensor by tensor (see assemble.py), so loading a file
needs about the memory of the finished model, not twice it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..formats.checkpoint_file import CheckpointFileError, CheckpointReader
from ..formats.checkpoint_layout import COMPONENT_PREFIXES, to_diffusers_recipes
from ..formats.dtypes import parse_dtype
from .assemble import fill_component
from .configs import component_config_file, load_config
from .detect import ModelKindError, check_overrides, detect_kind, detect_v_parameterization
from .meta import component_on_meta
from .model import StableDiffusionModel

__all__ = ["load_model", "ModelKindError", "CheckpointFileError"]

# Bundled configs tried, in order, for each kind of file; the first whose shapes all match is used.
CANDIDATE_CONFIGS = {"sd1": ("sd15", "tiny-sd"), "sd2": ("sd21",), "sdxl": ("sdxl", "tiny-sdxl")}
# Checkpoint keys never kept: EMA copies of the U-Net are as big as the model and no trainer reads them.
_DROPPED_PREFIXES = ("model_ema.",)


def text_components(kind: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]


def load_model(source: str | os.PathLike, *, v2: bool | None = None, v_parameterization: bool | None = None,
               sdxl: bool | None = None, config: str | os.PathLike | None = None,
               vae: str | os.PathLike | None = None, dtype: str | torch.dtype = torch.float32,
               vae_dtype: str | torch.dtype | None = None, no_half_vae: bool = False) -> StableDiffusionModel:
    """Load a Stable Diffusion model.

    ``source``: a .safetensors/.ckpt file, a diffusers folder, or "demo:tiny-sd"/"demo:tiny-sdxl".
    ``v2``/``sdxl``: checked against the file (a wrong one is an error); ``v_parameterization``: overrides the
    detected prediction type (an error only against an explicit ``v_pred`` marker). ``config``: a bundled
    config name or a diffusers-style config folder, when the file's shapes match none of the bundled ones.
    ``vae``: a separate VAE file or folder. ``dtype``: for all weights; ``vae_dtype`` or ``no_half_vae``
    (float32) for the VAE.
    """
    dtype = parse_dtype(dtype, "dtype")
    vae_dtype = torch.float32 if no_half_vae else (parse_dtype(vae_dtype, "vae_dtype") or dtype)
    source = os.fspath(source)
    if source.startswith("demo:"):
        from .demo import demo_file

        path, config_name = demo_file(source)
        source, config = str(path), config if config is not None else config_name
    if os.path.isdir(source):
        return _load_folder(source, v2=v2, v_parameterization=v_parameterization, sdxl=sdxl, dtype=dtype,
                            vae_dtype=vae_dtype, vae=vae)
    if os.path.isfile(source):
        return _load_single_file(source, v2=v2, v_parameterization=v_parameterization, sdxl=sdxl,
                                 config=config, dtype=dtype, vae_dtype=vae_dtype, vae=vae)
    raise FileNotFoundError(f"{source}: no such file or folder (expected a .safetensors/.ckpt checkpoint, a "
                            "diffusers model folder, or demo:tiny-sd / demo:tiny-sdxl)")


# --- single files --------------------------------------------------------------------------------------------
def _load_single_file(path: str, *, v2, v_parameterization, sdxl, config, dtype, vae_dtype,
                      vae) -> StableDiffusionModel:
    skip_vae = vae is not None
    with CheckpointReader(path) as reader:
        keys = reader.keys()
        kind = detect_kind(path, keys)
        check_overrides(path, kind, v2, sdxl)
        v_pred = detect_v_parameterization(path, kind, keys, reader.get, v_parameterization)
        components = ["unet", *text_components(kind)] + ([] if skip_vae else ["vae"])
        prefixes = COMPONENT_PREFIXES[kind]
        for component in components:
            if not any(k.startswith(prefixes[component]) for k in keys):
                hint = "; pass a VAE file as vae=" if component == "vae" else ""
                raise ModelKindError(f"{path}: a {kind} checkpoint without {component} tensors (no keys starting "
                                     f"with {prefixes[component]!r}){hint}")
        configs, checked = _match_config(path, reader, kind, components, config, v_pred)
        recipes = {c: plan for c, (_, plan) in checked.items()}
        modules = {}
        for component in components:
            prefix = prefixes[component]
            meta, plan = checked[component]
            modules[component] = fill_component(
                component, configs[component],
                lambda module, plan=plan, prefix=prefix: (
                    (key, r.build([reader.get(prefix + s) for s in r.sources])) for key, r in plan.items()),
                vae_dtype if component == "vae" else dtype, f"{path} ({component})", module=meta)
        used = {prefixes[c] + s for c in components for r in recipes[c].values() for s in r.sources}
        skipped_vae = prefixes["vae"] if skip_vae else None
        extras = {k: reader.get(k).clone() for k in keys
                  if k not in used and not k.startswith(_DROPPED_PREFIXES)
                  and not (skipped_vae and k.startswith(skipped_vae))}
        if vae is not None:
            modules["vae"] = _separate_vae(vae, kind, configs["vae"], vae_dtype,
                                           "the VAE config of the model's config")
        return _model(kind, v_pred, modules, configs["scheduler"], path, extras)


def _match_config(path, reader, kind, components, config, v_pred):
    """The first candidate config whose every tensor shape matches the file: (configs, {component: (its module
    on meta, its recipes)})."""
    candidates = [config] if config is not None else list(CANDIDATE_CONFIGS[kind])
    prefixes = COMPONENT_PREFIXES[kind]
    problems = []
    for name in candidates:
        configs = _configs(name, kind, v_pred)
        _adapt_unet_config(configs["unet"], reader, prefixes["unet"])
        try:
            checked = {c: _recipes_checked(reader, kind, c, configs[c], prefixes[c]) for c in components}
        except ValueError as e:
            problems.append(f"config {name}: {e}")
            continue
        return configs, checked
    raise ModelKindError(f"{path}: a {kind} checkpoint whose tensors match no bundled config "
                         f"({'; '.join(problems)}); pass config= a diffusers-style config folder for this model")


# (component, config as JSON) -> (state-dict shapes, the module's config) of every component built on meta in
# this process: a config tried again (the first candidate rejected at each load of a tiny model) is not rebuilt
_LAYOUTS: dict[tuple[str, str], tuple[dict[str, torch.Size], Any]] = {}


def _layout(component: str, config: Mapping[str, Any]) -> tuple[dict[str, torch.Size], Any, torch.nn.Module | None]:
    """(state-dict shapes, module config, the module on meta if this call had to build it, else None)."""
    key = (component, json.dumps(config, sort_keys=True, default=str))
    if key in _LAYOUTS:
        return (*_LAYOUTS[key], None)
    module = component_on_meta(component, config)
    # a copy: the module built here may become a loaded model whose config its user changes
    _LAYOUTS[key] = ({k: v.shape for k, v in module.state_dict().items()}, copy.deepcopy(module.config))
    return (*_LAYOUTS[key], module)


def _recipes_checked(reader, kind, component, config, prefix):
    """(``component`` on meta, or None where fill_component is to build it; its recipes), after checking on meta
    tensors that each recipe builds the expected shape."""
    shapes, module_config, module = _layout(component, config)
    ckpt_keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]
    recipes = to_diffusers_recipes(kind, component, shapes.keys(), module_config, ckpt_keys, prefix=prefix)
    for key, recipe in recipes.items():
        got = recipe.build([reader.meta_tensor(prefix + s) for s in recipe.sources]).shape
        if got != shapes[key]:
            raise ValueError(f"{component} {key} would be {tuple(got)} from the file's "
                             f"{prefix + recipe.sources[0]} but the config needs {tuple(shapes[key])}")
    return module, recipes


def _adapt_unet_config(unet_cfg: dict, reader: CheckpointReader, prefix: str) -> None:
    # Inpainting (9) and instruct-pix2pix (8) U-Nets differ from their base only in conv_in's input channels.
    key = prefix + "input_blocks.0.0.weight"
    if key in reader and len(reader.shape(key)) == 4:
        unet_cfg["in_channels"] = reader.shape(key)[1]


def _configs(name: str | os.PathLike, kind: str, v_pred: bool) -> dict[str, dict[str, Any]]:
    """Per-component config dicts (and "scheduler") from a bundled name or a config folder."""
    components = ["unet", "vae", *text_components(kind), "scheduler"]
    if os.path.isdir(name):
        out = _folder_configs(Path(name), components, "config folder")
    else:
        out = {component: copy.deepcopy(load_config(str(name), component)) for component in components}
    out["scheduler"]["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    if kind == "sd2" and not os.path.isdir(name):  # 768-v models sample at 768, the 512 base at 512
        out["unet"]["sample_size"] = 96 if v_pred else 64
    return out


# --- diffusers folders ---------------------------------------------------------------------------------------
def _load_folder(folder: str, *, v2, v_parameterization, sdxl, dtype, vae_dtype, vae) -> StableDiffusionModel:
    from .diffusers_folder import folder_kind, read_component_tensors, text_encoder_class

    root = Path(folder)
    kind = folder_kind(root)
    check_overrides(folder, kind, v2, sdxl)
    components = ["unet", *text_components(kind)] + ([] if vae is not None else ["vae"])
    configs = _folder_configs(root, [*components, "scheduler"], "diffusers folder")
    for c in text_components(kind):  # a config.json without "architectures": the class model_index.json names
        configs[c]["architectures"] = [text_encoder_class(root, c, configs[c])]
    predicted = configs["scheduler"].get("prediction_type", "epsilon") == "v_prediction"
    v_pred = predicted if v_parameterization is None else bool(v_parameterization)
    configs["scheduler"]["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    modules = {c: fill_component(c, configs[c], lambda m, c=c: read_component_tensors(root / c, m),
                                 vae_dtype if c == "vae" else dtype, f"{root / c}") for c in components}
    if vae is not None:  # a single-file vae= is read with the folder's own VAE config when it has one
        if component_config_file(root, "vae").is_file():
            vae_config = _folder_configs(root, ["vae"], "diffusers folder")["vae"]
            origin = str(component_config_file(root, "vae"))
        else:
            vae_config = _configs(CANDIDATE_CONFIGS[kind][0], kind, v_pred)["vae"]
            origin = f"the bundled {CANDIDATE_CONFIGS[kind][0]!r} VAE config"
        modules["vae"] = _separate_vae(vae, kind, vae_config, vae_dtype, origin)
    return _model(kind, v_pred, modules, configs["scheduler"], folder, {})


# --- shared --------------------------------------------------------------------------------------------------
def _folder_configs(root: Path, components: list[str], what: str) -> dict[str, dict[str, Any]]:
    """The config dicts of ``components`` in a diffusers-style folder (``what`` names it in errors)."""
    from .diffusers_folder import read_json

    out = {}
    for component in components:
        file = component_config_file(root, component)
        if not file.is_file():
            raise ModelKindError(f"{root}: {what} has no {component}/{file.name}")
        out[component] = read_json(file)
    return out


def _model(kind, v_pred, modules, scheduler_config, source, extras) -> StableDiffusionModel:
    from .tokenizer import tokenizers_for

    tes = [modules[c] for c in text_components(kind)]
    return StableDiffusionModel(kind=kind, v_parameterization=v_pred, unet=modules["unet"], vae=modules.get("vae"),
                                text_encoders=tes, tokenizers=tokenizers_for(kind),
                                scheduler_config=dict(scheduler_config), source=source, extras=extras)


def _separate_vae(source, kind: str, default_config: Mapping[str, Any], dtype,
                  config_origin: str) -> torch.nn.Module:
    from .vae_file import load_vae

    return load_vae(source, kind, default_config, dtype, config_origin)

"""sd-scripts' network-module interface: `--network_module lorakit.kohya` for train_network.py and
sdxl_train_network.py (and gen_img*.py), on top of lorakit's Network.

What sd-scripts calls (read in kohya-ss/sd-scripts train_network.py, networks/lora.py, gen_img_diffusers.py, and
LyCORIS' lycoris/kohya.py), and what it gets here:

module level
  create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
                 neuron_dropout=args.network_dropout, **net_kwargs) -> network
      text_encoder is one CLIPTextModel, or [te1, te2] for SDXL; network_dim may be None (-> 4), network_alpha None
      (-> 1); net_kwargs are the `--network_args key=value` strings, plus dropout=args.network_dropout (None when
      unset) that train_network adds when the user gave none. Parsed by seed 001's rules: "True"/"False", numbers;
      an unknown name or a bad value is an error naming the arg. Defaults follow LyCORIS: algo lora, preset full,
      conv_dim = network_dim.
  create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                              **net_kwargs) -> (network, weights_sd)
      --dim_from_weights (multiplier 1, then apply_to and load_weights), --base_weights (for_inference=True, then
      merge_to), gen_img (then apply_to + load_state_dict(weights_sd, False), or merge_to). The file decides algo,
      dims and layout; dropouts, LoRA+ ratios and block lr weights from net_kwargs still apply.
network (train_network.py, in call order)
  prepare_network(args), update_grad_norms(), update_norms(), weight_norms() ...   optional (hasattr): not defined
  apply_to(text_encoder, unet, train_text_encoder, train_unet)   the flags select which adapters stay (others dropped)
  load_weights(args.network_weights) -> info (missing/unexpected keys); either SDXL name style
  enable_gradient_checkpointing()                               no-op: adapters need none
  prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr list, unet_lr, learning_rate)  (newer sd-scripts)
  prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate) -> (params, lr_descriptions)  (older)
  prepare_optimizer_params(text_encoder_lr, unet_lr)            (oldest, after a TypeError)
  to(dtype), train(), eval(), state_dict()/load_state_dict()    nn.Module (full_fp16, accelerate save/resume)
  prepare_grad_etc(text_encoder, unet); on_epoch_start(text_encoder, unet) (-> train()); on_step_start(te, unet)
  get_trainable_params() -> the parameters to clip
  apply_max_norm_regularization(args.scale_weight_norms, device) -> (keys_scaled, mean_norm, maximum_norm)
  set_multiplier(0.0) / set_multiplier(1.0)                     differential output preservation
  save_weights(ckpt_file, save_dtype, metadata)                 save_dtype may be None; metadata str -> str
  merge_to(text_encoder, unet, weights_sd, weight_dtype, device)
  is_mergeable(), pre_calculation(), backup_weights(), restore_weights()   gen_img --network_merge/--network_pre_calc
      (one copy of each layer's original weights, shared by every network on it, as in kohya)
  set_loraplus_lr_ratio(ratio, unet_ratio, text_encoder_ratio); text_encoder_loras, unet_loras, adapter.lora_name
  set_region(), set_current_generation()   gen_img --mask_path / regional prompts: NotImplementedError saying so
Not provided: set_enabled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..algos.base import COMMON_OPTIONS
from ..algos.options import OptionError, parse_options, to_float, to_int
from .blocks import KOHYA_SD25, KOHYA_SDXL23, parse_kohya_block_lr_kwargs
from .config import split_network_kwargs
from .create import create_network as _create
from .load import kohya_tensors, load_network, read_adapter_tensors
from .names import NameIndex
from .network import Network

__all__ = ["create_network", "create_network_from_weights", "KohyaNetwork"]
log = logging.getLogger(__name__)

# network_args that repeat a script argument: the script argument wins unless it was left unset (None)
_SCRIPT_ARGS = {"dim": "network_dim", "network_dim": "network_dim", "lora_dim": "network_dim",
                "alpha": "network_alpha", "network_alpha": "network_alpha", "multiplier": "multiplier"}
# what to do instead, per script argument ({} is the value given in network_args)
_GIVE_INSTEAD = {
    "network_dim": "give it once, as --network_dim {}",
    # argparse's default: train_network.py always passes it, given or not
    "network_alpha": "sd-scripts sets --network_alpha to 1 when it is not given; give it as --network_alpha {}",
    "multiplier": "sd-scripts passes the multiplier itself (1.0 for training), network_args cannot change it",
}
# comma lists that kohya parses later with bare int()/float(): checked here so that errors name the arg
_NUMBER_LISTS = {"block_dims": to_int, "conv_block_dims": to_int, "block_alphas": to_float,
                 "conv_block_alphas": to_float, "down_lr_weight": to_float, "mid_lr_weight": to_float,
                 "up_lr_weight": to_float}
# what a network built from a file still takes from network_args (its shapes come from the file)
_RUNTIME_OPTIONS = frozenset({"dropout", "rank_dropout", "rank_dropout_scale", "module_dropout"})
_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
_FROM_WEIGHTS_KEYS = _RUNTIME_OPTIONS | set(_LR_KEYS) | {
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae,
                   text_encoder, unet, /, neuron_dropout: float | None = None, **kwargs: Any) -> "KohyaNetwork":
    # positional-only, as sd-scripts passes them: network_args named multiplier/network_dim/network_alpha then
    # reach kwargs and get the error below instead of a TypeError about duplicate arguments
    args = _network_args(kwargs)
    dropout = _one_dropout(neuron_dropout, args.pop("dropout", None))
    script = {"network_dim": network_dim, "network_alpha": network_alpha, "multiplier": multiplier}
    for key in [k for k in args if k in _SCRIPT_ARGS]:
        target = _SCRIPT_ARGS[key]
        if script[target] is not None:
            raise OptionError(f"network_args '{key}={args[key]}' repeats the script argument {target} "
                              f"(= {script[target]!r}); {_GIVE_INSTEAD[target].format(args[key])}")
        script[target] = args.pop(key)
    options = {"dim": 4 if script["network_dim"] is None else script["network_dim"],
               "alpha": 1.0 if script["network_alpha"] is None else script["network_alpha"],
               "multiplier": script["multiplier"], **args}
    if dropout:  # 0 means none, and then algorithms without dropout accept it too
        options["dropout"] = dropout
    text_encoders = _text_encoders(text_encoder)
    net = _create(unet, text_encoders, **options)
    return KohyaNetwork.wrap(net, _name_index(net, unet, text_encoders))


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs: Any) -> tuple["KohyaNetwork", dict]:
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata, _ = read_adapter_tensors(file)
    text_encoders = _text_encoders(text_encoder)
    # gen_img passes every file to this: its messages name the file, not "the state dict"
    net = load_network(unet, weights_sd, text_encoders, multiplier=to_float("multiplier", multiplier),
                       where=None if file is None else str(file))
    net.metadata = metadata
    network = KohyaNetwork.wrap(net, _name_index(net, unet, text_encoders))
    network._take_runtime_args(_network_args(kwargs))
    return network, weights_sd


class KohyaNetwork(Network):
    """A lorakit Network with the methods sd-scripts calls. Its state_dict keys are the file's keys."""

    @classmethod
    def wrap(cls, net: Network, index: NameIndex | None = None) -> "KohyaNetwork":
        """The same adapters as `net`; `index` lets files name the modules in either style (SDXL diffusers/SGM)."""
        new = cls(dict(net.adapters()), net.entries, net.arch, net.multiplier, net.lr_weights, net.loraplus)
        new.config, new.metadata = getattr(net, "config", None), getattr(net, "metadata", {})
        new._trainable = None
        new._aliases = {}
        for alias in index.all_names() if index is not None else ():
            target = index.find(alias)
            primary = index.name_of(target.component, target.path)
            if primary in new.entries and alias != primary:
                new._aliases[alias] = primary
        for name, adapter in new.adapters():
            adapter.lora_name = name  # kohya's LoRAModule attribute, read by some scripts
        return new

    # ----- what the network adapts -----
    @property
    def text_encoder_loras(self) -> list[nn.Module]:
        return [a for n, a in self.adapters() if self.entries[n].is_text_encoder]

    @property
    def unet_loras(self) -> list[nn.Module]:
        return [a for n, a in self.adapters() if not self.entries[n].is_text_encoder]

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True) -> None:
        """Route the model's layers through the adapters. As in kohya, the adapters of a part not applied are
        dropped: they neither train nor get saved. (The models are the ones the network was created on.)"""
        keep_te, keep_unet = apply_text_encoder is not False, apply_unet is not False
        for name, entry in list(self.entries.items()):
            if not (keep_te if entry.is_text_encoder else keep_unet):
                delattr(self, name)
                del self.entries[name]
                self.lr_weights.pop(name, None)
                self._block_multipliers.pop(name, None)
        log.info("lorakit: %d text-encoder and %d U-Net adapters applied", len(self.text_encoder_loras),
                 len(self.unet_loras))
        self.apply()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier

    # ----- optimizer -----
    def set_loraplus_lr_ratio(self, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None,
                              loraplus_text_encoder_lr_ratio=None) -> None:
        given = {("all", "loraplus_lr_ratio"): loraplus_lr_ratio, ("unet", "loraplus_unet_lr_ratio"):
                 loraplus_unet_lr_ratio, ("te", "loraplus_text_encoder_lr_ratio"): loraplus_text_encoder_lr_ratio}
        self.loraplus = {k: None if v is None else to_float(name, v) for (k, name), v in given.items()}

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """(param groups, lr descriptions). text_encoder_lr may be a list (SDXL: one per text encoder; one value or
        an empty list as sd-scripts passes them). An lr of 0 leaves those adapters out; an lr of None uses
        default_lr, or the optimizer's lr when that is None too."""
        if isinstance(text_encoder_lr, (list, tuple)):
            lrs = [None if v is None else float(v) for v in text_encoder_lr]
            text_encoder_lr = None if not lrs else lrs[0] if len(lrs) == 1 else lrs[:2]
        self.requires_grad_(True)  # a second call may train what an lr of 0 froze before
        groups = self.optimizer_param_groups(unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, default_lr=default_lr)
        self._trainable = [p for g in groups for p in g["params"]]
        return groups, [g["name"].replace("text_encoder", "textencoder").replace("_plus", " plus") for g in groups]

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def get_trainable_params(self) -> list[nn.Parameter]:
        if self._trainable is not None:
            return list(self._trainable)
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        pass  # the adapters keep no activations worth recomputing

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        for p in self.get_trainable_params():
            p.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, *args) -> None:
        pass

    # ----- files -----
    def save_weights(self, file, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        """.safetensors through Network.save (atomic, with kohya's sshs hashes); other suffixes (--save_model_as
        ckpt/pt) a plain state dict, atomic too, without the metadata, which kohya drops there."""
        if os.path.splitext(os.fspath(file))[1].lower() == ".safetensors":
            self.save(file, dtype, metadata or None)
            return
        from ..formats.safetensors_io import save_tensors

        save_tensors(self.state_dict(), file, dtype=dtype)

    def load_weights(self, file):
        """Load a .safetensors file's tensors (names in either style) into this network; returns torch's
        (missing_keys, unexpected_keys), as kohya does. Shapes that differ are an error."""
        tensors, _, where = read_adapter_tensors(file)
        tensors, _, _ = kohya_tensors(tensors, self.arch, where)  # OneTrainer OMI, sd-scripts OFT files too
        return self.load_state_dict(tensors, strict=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self._own_names(state_dict), strict=strict, assign=assign)

    def _own_names(self, tensors) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            name, dot, suffix = key.partition(".")
            out[self._aliases.get(name, name) + dot + suffix] = value
        return out

    # ----- merging -----
    def is_mergeable(self) -> bool:
        return True  # every algorithm has a weight form

    @torch.no_grad()
    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None) -> None:
        """Merge the adapters that weights_sd holds into the model weights, for good, at this network's multiplier
        (the weights keep their dtype; `device` is where the change is computed)."""
        tensors = self._own_names(weights_sd)
        self.load_state_dict(tensors, strict=False)
        if device is not None:
            self.to(device)
        names = {key.partition(".")[0] for key in tensors}
        for name, adapter in self.adapters():
            if name in names:
                adapter.merge(keep_backup=False)

    # gen_img --network_pre_calc calls, per batch, set_multiplier, then restore_weights of every network, then
    # pre_calculation of every network, all in network order. As in kohya (org_module._lora_org_weight), each
    # layer keeps one copy of its original weights, shared by every network on it: the first restore_weights
    # puts it back and un-merges every network merged into that layer, whichever network restores first.
    def backup_weights(self) -> None:
        """Keep each adapted layer's original weights, unless another network already keeps them."""
        for _, adapter in self.adapters():
            if adapter.host not in _ORIGINALS:
                _ORIGINALS[adapter.host] = _LayerOriginal.of(adapter.host)

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Merge into the weights at the current multiplier; restore_weights (of any network) undoes it."""
        self.backup_weights()  # gen_img calls it first; other callers need not
        self.merge(keep_backup=False)
        for _, adapter in self.adapters():
            _ORIGINALS[adapter.host].merged.append(adapter)

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Put back the original weights of this network's layers, with every network merged into them."""
        for _, adapter in self.adapters():
            original = _ORIGINALS.get(adapter.host)
            if original is not None:
                original.restore(adapter.host)

    # ----- gen_img regional networks: not supported -----
    def set_region(self, sub_prompt_index, is_last_network, mask) -> None:
        _no_regions()

    def set_current_generation(self, batch_size, num_sub_prompts, width, height, shared, ds_ratio=None) -> None:
        _no_regions()

    # ----- network_args of a network built from a file -----
    def _take_runtime_args(self, args: dict[str, Any]) -> None:
        config, adapter_args = split_network_kwargs(args)  # unknown names and bad values fail, naming the arg
        options, given = parse_options(adapter_args)
        runtime = {k: getattr(options, k) for k in given & _RUNTIME_OPTIONS}
        for _, adapter in self.adapters():
            use = {k: v for k, v in runtime.items() if k in COMMON_OPTIONS | type(adapter).accepts}
            if use:
                adapter.options = dataclasses.replace(adapter.options, **use)
        if any(v is not None for v in (config.loraplus_lr_ratio, config.loraplus_unet_lr_ratio,
                                        config.loraplus_text_encoder_lr_ratio)):
            self.set_loraplus_lr_ratio(config.loraplus_lr_ratio, config.loraplus_unet_lr_ratio,
                                       config.loraplus_text_encoder_lr_ratio)
        lr = parse_kohya_block_lr_kwargs(self.arch == "sdxl", {k: getattr(config, k) for k in _LR_KEYS})
        if lr is not None and self.arch is not None:
            layout = KOHYA_SDXL23 if self.arch == "sdxl" else KOHYA_SD25
            for name, entry in self.entries.items():
                i = layout.index(entry.path, "unet") if entry.component == "unet" else None
                if i is not None:
                    self.lr_weights[name] = lr[i]
        ignored = sorted(k for k in args if k not in _FROM_WEIGHTS_KEYS)
        if ignored:
            log.warning("lorakit: the weights file decides the network's layout; ignoring network_args %s",
                        ", ".join(ignored))


# ----- the layers' original weights, for gen_img --network_pre_calc -----
@dataclasses.dataclass
class _LayerOriginal:
    weight: torch.Tensor
    bias: torch.Tensor | None  # None: the layer had no bias (a merge may add one)
    merged: list = dataclasses.field(default_factory=list)  # the adapters merged into the layer now

    @classmethod
    def of(cls, layer: nn.Module) -> "_LayerOriginal":
        bias = getattr(layer, "bias", None)
        return cls(layer.weight.detach().clone(), None if bias is None else bias.detach().clone())

    def restore(self, layer: nn.Module) -> None:
        if not self.merged:
            return
        layer.weight.copy_(self.weight)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        elif getattr(layer, "bias", None) is not None:
            layer.bias = None  # a merge added it
        for adapter in self.merged:
            adapter.merged = False
        self.merged.clear()


# keyed by the model's layer: it lives as long as the model, as kohya's attribute on the layer does
_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, _LayerOriginal]" = weakref.WeakKeyDictionary()


# ----- helpers -----
def _no_regions():
    # kohya's regional LoRA reshapes the batches inside the U-Net's cross-attention (one query per sub-prompt,
    # masked sums over every network at attn2.to_out): code for its LoRA alone, which lorakit's algorithms lack
    raise NotImplementedError(
        "lorakit.kohya does not do gen_img's regional networks: gen_img turns them on whenever --mask_path is given "
        "with --network_module (the mask's channels become the networks' regions, also for plain inpainting), and "
        "regional prompts (AND) need them. For inpainting, merge the networks with --network_merge (merged networks "
        "get no region); for regions, use --network_module networks.lora")


def _network_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """network_args as sd-scripts passes them: string values; None means not given."""
    args = {str(k).strip(): v for k, v in kwargs.items() if v is not None}
    _check_number_lists(args)
    return args


def _check_number_lists(args: dict[str, Any]) -> None:
    for key, parse in _NUMBER_LISTS.items():
        value = args.get(key)
        lr = key.endswith("lr_weight")
        if not isinstance(value, str) or (key != "mid_lr_weight" and lr and "," not in value):
            continue  # down/up_lr_weight without a comma is a shape name ("cosine+.5"), checked later
        for item in value.split(","):
            if item.strip() or not lr:  # kohya reads an empty lr weight as 0
                parse(key, item)


def _one_dropout(neuron_dropout, dropout) -> float | None:
    """--network_dropout arrives as neuron_dropout, and again as network_args dropout when the user gave none."""
    given = {name: to_float(name, v) for name, v in (("network_dropout", neuron_dropout), ("dropout", dropout))
             if v is not None}
    if len(set(given.values())) > 1:
        raise OptionError(f"dropout given twice with different values: --network_dropout {neuron_dropout} and "
                          f"network_args dropout={dropout}")
    return next(iter(given.values()), None)


def _name_index(net: Network, unet, text_encoders) -> NameIndex | None:
    return NameIndex.for_sd(unet, text_encoders, net.arch) if net.arch is not None else None  # None: any model


def _text_encoders(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]

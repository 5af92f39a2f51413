"""``lorakit train``: load the model, build the network and the data, and run the loop with saving, sampling,
logging and resume. Each piece lives in its own module; this one wires them in sd-scripts' order."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time
import uuid
from pathlib import Path

import torch

from ..algos.options import OptionError
from ..formats.atomic import atomic_write, remove_stale_temporaries
from ..formats.dtypes import parse_dtype
from .loss import DiffusionLoss, LossOptions
from .noise import NoiseOptions, make_noise_scheduler
from .options import SECRET_OPTIONS, explore_only, explore_only_note
from .base_model import (checkpoint_text_encoders, compile_models, enable_checkpointing, fp8_targets, keep_in_fp8,
                         merge_base_weights)
from .config import to_toml
from .console_log import console_logging
from .dataset_config import resolved_settings
from .distributed import current_world
from .initial_step import initial_progress
from .loss_scale import make_loss_scaler
from .fused_backward import install_fused_step
from .outputs import OutputNames
from .parking import Parking
from .state import Progress, check_state_folder, load_state, restore_states, save_state, saved_seed
from .step import StepContext, batch_loss

__all__ = ["train", "TrainingError"]

_NOISE_OPTIONS = [f.name for f in dataclasses.fields(NoiseOptions)]
_LOSS_OPTIONS = [f.name for f in dataclasses.fields(LossOptions)]
# Options that do not change what is computed, so a resumed run may change them.
_RESUME_FREE = {"resume", "output_dir", "output_name", "save_every_n_steps", "save_every_n_epochs", "save_state",
                "save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state", "save_last_n_epochs_state",
                "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
                "sample_sampler", "logging_dir", "log_with", "log_prefix", "training_comment", "no_metadata",
                "max_data_loader_n_workers", "persistent_data_loader_workers", "initial_epoch", "initial_step",
                "skip_until_initial_step", "save_n_epoch_ratio", "save_state_on_train_end", "metadata_title",
                "metadata_author", "metadata_description", "metadata_license", "metadata_tags", "metadata_usage_hint",
                "metadata_thumbnail", "metadata_merged_from", "metadata_trigger_phrase", "metadata_preprocessor",
                "metadata_is_negative_embedding", "wandb_run_name", "log_tracker_name",
                "log_tracker_config", "log_config", "console_log_level", "console_log_file", "console_log_simple",
                "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "output_config",
                "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                "huggingface_repo_visibility", "save_state_to_huggingface", "async_upload", "resume_from_huggingface",
                # how the files are written, and how memory is spent on the same computation
                "save_precision", "save_model_as", "gradient_checkpointing", "cpu_offload_checkpointing",
                "vae_batch_size", "sdpa", "xformers", "mem_eff_attn", "lowram", "highvram", "cache_latents_to_disk",
                "skip_cache_check", "cache_info", "offload_optimizer_nvme_path", "offload_param_nvme_path",
                # accepted with no effect
                "tokenizer_cache_dir", "disable_mmap_load_safetensors", "zero3_init_flag", "zero3_save_16bit_model",
                # the dataset_config file's values are compared instead (resolved_settings), not its path
                "dataset_config",
                # a resume may train on for longer, as in sd-scripts (the lr schedule then follows the new length)
                "max_train_steps", "max_train_epochs"}


log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says where it stopped and what was kept."""


def _text_clip_skip(model, config) -> int | None:
    """The clip_skip the text encoding takes: none for SDXL, where the run has noted it once already."""
    return None if model.is_sdxl else config.clip_skip


def _check_image_files(*datasets) -> None:
    """Every image of the datasets checked for damage before the first step (the folder scan reads headers only);
    caching latents decodes them all up front anyway."""
    from ..data.images import check_image_data
    from ..tools.extract import progress

    paths = sorted({entry.path for dataset in datasets if dataset is not None for entry in dataset.entries})
    for path in progress(paths, "checking images"):
        check_image_data(path)


def train(config, *, stop_at_step: int | None = None, timings: dict | None = None,
          explore: bool = False) -> Path | None:
    """Train the network ``config`` describes. Returns the final adapter file (None when ``stop_at_step``, a
    test hook that stops like a killed run right after that step's saves). ``timings``, if given, receives the
    seconds spent per phase of the steps (data, text_and_noise, unet_forward, backward, optimizer, total) and
    the number of batches. ``explore``: `lorakit explore`, which trains the application rates of the adapter files
    in network_weights instead of an adapter, and saves the rates."""
    from .checks import check_runnable

    check_runnable(config)
    with console_logging(config):
        run = _Run(config, explore)
        try:
            return run.run(stop_at_step, timings)
        finally:
            try:
                if run.engine is not None:
                    run.engine.close()
            finally:
                if run.uploads is not None:
                    run.uploads.close()  # async uploads end before train() returns


class _Run:
    def __init__(self, config, explore: bool = False):
        self.explore = explore
        self.engine = None  # DeepSpeed's, closed when the run ends
        if explore:
            _check_explore(config)
        else:
            for name in explore_only(config.given):
                log.warning("%s", explore_only_note(name))
        self.resume_folder = None  # the state to resume from, downloaded first when it is on the Hub
        if config.resume:
            if config.resume_from_huggingface:
                from .hub import download_state

                self.resume_folder = download_state(config)
            else:
                self.resume_folder = config.resume
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.world = current_world(self.device, config.ddp_timeout, group=config.deepspeed)
        self.names = OutputNames(config.output_dir, config.output_name, config.save_model_as)
        self._restore_states()
        if self.resume_folder:
            check_state_folder(self.resume_folder)  # before the model loads
        if config.seed is None:  # drawn once and kept: in the saved config, the metadata and the state
            seed = saved_seed(self.resume_folder) if self.resume_folder else None
            config = dataclasses.replace(config, seed=int.from_bytes(os.urandom(4), "little") if seed is None else seed)
        self.config = config
        self.seed = config.seed
        mp = config.mixed_precision
        self.weight_dtype = parse_dtype(mp, "mixed_precision")
        self.autocast_dtype = None if mp == "no" else self.weight_dtype
        self.save_dtype = parse_dtype(config.save_precision, "save_precision") if config.save_precision else None
        self.uploads = None
        self.dataset_cls = None  # dataset_class, imported when the run starts
        if config.huggingface_repo_id and self.world.main:
            from .hub import HubUploader

            self.uploads = HubUploader(config)

    def _restore_states(self) -> None:
        """States that a kill while re-saving them left only as temporaries are put back, by the main process,
        before any process reads the one to resume from."""
        if self.world.main:
            for state, copy in restore_states(self.names.dir, self.resume_folder):
                log.warning("%s: put back from %s, the complete copy a run killed while saving it left", state,
                            copy.name)
        self.world.barrier()

    # --- setup --------------------------------------------------------------------------------------------
    def _load_model(self, parking: Parking):
        """The base model, frozen. On the CPU, as sd-scripts loads it, each model waiting for its turn on the
        device (see Parking); with lowram, straight on the device (sd-scripts then keeps them there)."""
        from ..models.load import load_model
        from .base_model import note_ignored
        from .checks import sdxl_clip_skip_note

        c = self.config
        note_ignored(c)
        given = c.given
        model = load_model(c.pretrained_model_name_or_path, v2=c.v2 if "v2" in given else None,
                           sdxl=c.sdxl if "sdxl" in given else None,
                           v_parameterization=c.v_parameterization if "v_parameterization" in given else None,
                           vae=c.vae or None, dtype=self.weight_dtype, no_half_vae=c.no_half_vae)
        if model.is_sdxl and not c.sdxl and (c.clip_skip or 1) > 1:  # (with sdxl given, the config noted it)
            log.warning("%s", sdxl_clip_skip_note(c.clip_skip))
        modules = [module.requires_grad_(False) for _, module in model.components()]
        if c.lowram:
            for module in modules:
                module.to(self.device)
        else:
            parking.wait(*modules)
        if c.xformers:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:  # the kohya_ss GUI writes xformers = true by default
                log.warning("lorakit train: xformers = true, but the xformers package is not installed; the U-Net "
                            "keeps PyTorch's scaled-dot-product attention (sdpa), which saves the same memory")
            else:
                model.unet.enable_xformers_memory_efficient_attention()
        return model

    def _make_network(self, model):
        from ..network.create import create_network
        from ..network.load import load_network

        c = self.config
        if self.explore:
            return self._rated_networks(model)
        if len(c.network_weights) > 1:
            raise TrainingError(f"network_weights: lorakit train starts from one adapter file, got "
                                f"{len(c.network_weights)} ({', '.join(c.network_weights)}); several files are for "
                                "lorakit explore")
        weights = c.network_weights[0] if c.network_weights else None
        tes = None if c.network_train_unet_only else model.text_encoders
        source = _unet_adapters(weights, model.kind) if weights and c.network_train_unet_only else weights
        if weights and c.dim_from_weights:
            net = load_network(model.unet, source, text_encoders=tes, where=str(weights))
            _unbind_unconstrained_rotations(net, weights)
        else:
            options = dict(c.network_kwargs())
            options.setdefault("dim", c.network_dim if c.network_dim is not None else 4)
            options.setdefault("alpha", c.network_alpha)
            if c.network_dropout is not None:
                options.setdefault("dropout", c.network_dropout)
            net = create_network(model.unet, tes, **options)
            if weights:
                _load_network_weights(net, source, str(weights), model.unet, tes)
        net.to(self.device, torch.float32 if not (c.full_fp16 or c.full_bf16) else self.weight_dtype)
        net.apply(hooks=c.deepspeed and c.zero_stage == 3)  # ZeRO-3 gathers each adapter in a forward hook
        net.train()
        return net

    def _rated_networks(self, model):
        """lorakit explore: the adapter files applied and frozen, and their application rates, which train."""
        from ..network.load import load_network
        from ..network.rates import ApplicationRates, rate_layout

        c = self.config
        nets = []
        for path in c.network_weights:
            if c.network_train_unet_only:
                # the text encoders run without the files' adapters (their outputs may be cached; cached with
                # adapters, they would hold the rate of the moment)
                net = load_network(model.unet, _unet_adapters(path, model.kind), where=str(path))
            else:
                net = load_network(model.unet, path, text_encoders=model.text_encoders)
            if net.arch is None:
                raise TrainingError(f"network_weights={path}: application rates need a Stable Diffusion network")
            net.to(self.device, torch.float32).requires_grad_(False)
            net.apply()
            net.eval()  # no dropouts, as sd-scripts' network.eval()
            nets.append(net)
        layout = rate_layout(model.kind, c.application_layout)
        rates = ApplicationRates(nets, layout).to(self.device)
        if rates.outside:
            name, weight = next(iter(rates.outside.items()))
            log.warning("%d adapter(s) lie in no block of layout %s and run at a fixed weight, as that layout's "
                        "block weights give them (e.g. %s at %g)", len(rates.outside), layout.key, name, weight)
        log.info("exploring the application rates of %d network(s) over layout %s (%s)", len(nets), layout.key,
                 ", ".join(layout.names))
        return rates

    def _dataset(self, model, cache: bool = True):
        from ..data import BatchOrder, make_loader

        c = self.config
        if c.dataset_class:
            ds, self.validation_dataset = self._custom_batches(model), None
        else:
            ds, self.validation_dataset = self._folder_datasets(model, cache)
        order = BatchOrder(ds)
        loader = make_loader(ds, order, max_workers=c.max_data_loader_n_workers,
                             persistent=c.persistent_data_loader_workers)
        return ds, order, loader

    def _folder_datasets(self, model, cache: bool):
        """The training dataset of the image folders (or dataset_config), and the validation one (or None), with
        their latents and text-encoder outputs cached as the options ask."""
        from ..data import TrainDataset, cache_latents, pixel_multiple
        from ..data.errors import NoValidationImages
        from ..data.from_config import specs_from_config, specs_from_folders

        c = self.config
        specs = specs_from_config(c.dataset_group) if c.dataset_group is not None else specs_from_folders(c)
        specs = self.world.scale_specs(specs)  # every process builds the global batches
        ds = TrainDataset(specs, tokenizers=model.tokenizers, max_token_length=c.max_token_length,
                          weighted_captions=c.weighted_captions, seed=self.seed, reso_multiple=pixel_multiple(model))
        val = None
        if any(spec.validation_split > 0 for spec in specs):  # the images validation_split holds out
            try:
                val = TrainDataset(specs, tokenizers=model.tokenizers, max_token_length=c.max_token_length,
                                   weighted_captions=c.weighted_captions, seed=self.seed,
                                   reso_multiple=pixel_multiple(model), validation=True)
            except NoValidationImages as err:  # sd-scripts trains on without validation
                log.warning("%s: training goes on without validation", err)
        if cache and (c.cache_latents or c.cache_latents_to_disk):
            if c.cache_latents_to_disk and not self.world.main:
                self.world.barrier()  # the main process writes the disk cache first; the others then read it
            with self.parking.borrowed(model.vae):
                for dataset in (ds, val) if val is not None else (ds,):
                    cache_latents(dataset, model.vae, vae_batch_size=c.vae_batch_size or 1,
                                  to_disk=c.cache_latents_to_disk, skip_check=c.skip_cache_check)
            if c.cache_latents_to_disk and self.world.main:
                self.world.barrier()
        elif cache:  # the images are decoded in the loop: a damaged one would stop the run hours in
            _check_image_files(ds, val)
        if cache and c.cache_text_encoder_outputs:  # before training, as sd-scripts caches them
            to_disk = c.cache_text_encoder_outputs_to_disk
            if to_disk and not self.world.main:
                self.world.barrier()  # as for latents: the main process writes the files, the others read them
            with self.parking.borrowed(*model.text_encoders):
                for dataset in (ds, val) if val is not None else (ds,):
                    self._cache_text(model, dataset, to_disk)
            if to_disk and self.world.main:
                self.world.barrier()
        return ds, val

    def _custom_batches(self, model):
        """dataset_class: the user's class (imported by run() before the model loaded) serves whole batches
        (sd-scripts' load_arbitrary_dataset), built with the model's tokenizer (SD1/SD2) or list of tokenizers
        (SDXL). No latent or text-encoder output caching and no validation split: the config checks refuse those."""
        from ..data import pixel_multiple
        from ..data.custom_batches import CustomBatches
        from ..data.custom_dataset import make_dataset

        c = self.config
        tokenizer = list(model.tokenizers) if model.is_sdxl else model.tokenizers[0]
        user = make_dataset(self.dataset_cls, c.dataset_class, tokenizer, c.max_token_length, c.resolution,
                            c.debug_dataset)
        return CustomBatches(user, c.dataset_class, tokenizers=model.tokenizers, max_token_length=c.max_token_length,
                             weighted_captions=c.weighted_captions, seed=self.seed,
                             reso_multiple=pixel_multiple(model), vae_scale_factor=model.vae_scale_factor,
                             latent_channels=model.vae.config.latent_channels, masked_loss=c.masked_loss)

    def _cache_text(self, model, dataset, to_disk: bool) -> None:
        """cache_text_encoder_outputs: each caption's frozen text-encoder outputs, encoded (tokenized as the
        batches are) under the training's autocast, in memory or (to_disk) in a file by its image."""
        from ..data.fingerprint import module_fingerprint
        from ..data.text_cache import cache_text_outputs
        from ..data.weighted import tokenize_weighted
        from ..models.text import encode_prompts

        c = self.config
        identity = repr(([module_fingerprint(te) for te in model.text_encoders], c.clip_skip, c.max_token_length,
                         str(self.autocast_dtype)))

        def encode(captions):
            ids = ([tokenize_weighted(t, captions, c.max_token_length)[0] for t in model.tokenizers]
                   if c.weighted_captions else None)
            autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                        else contextlib.nullcontext())
            with torch.no_grad(), autocast:
                out = encode_prompts(model, captions, c.clip_skip, c.max_token_length, input_ids=ids)
            return out.hidden, out.pooled

        split = model.text_encoders[0].config.hidden_size if model.is_sdxl else None
        cache_text_outputs(dataset, encode, identity, batch_size=dataset.specs[0].batch_size, split=split,
                           skip_check=c.skip_cache_check, to_disk=to_disk)

    def _place_for_training(self, model) -> None:
        """The VAE and text encoders whose outputs the image folders' caches now hold stay off the accelerator until
        a sample needs them (dataset_class batches bring images and captions: their models are used); every other
        model joins the device."""
        c, parking = self.config, self.parking
        cached, what = [], []
        if not c.dataset_class:
            if c.cache_latents or c.cache_latents_to_disk:
                cached.append(model.vae)
                what.append("VAE")
            if c.cache_text_encoder_outputs:
                cached.extend(model.text_encoders)
                what.append("text encoders")
        if what and parking.frees_memory:
            log.info("the %s stay on the CPU: their outputs are cached", " and ".join(what))
        parking.park(*cached)
        parking.bring(*(m for _, m in model.components() if not any(m is x for x in cached)))

    def _batch_sizes(self, ds) -> list[int]:
        """Each dataset's batch size per process (the specs hold the global batch of all processes)."""
        sizes = [spec.batch_size // self.world.size for spec in getattr(ds, "specs", ())]
        return sizes or [self.config.train_batch_size]  # dataset_class: its batches are the user's

    def _settings(self) -> dict[str, str]:
        """What must not change between a run and its resume, as text (kept in the state, to name what changed)."""
        values = {k: v for k, v in self.config.as_dict().items() if k not in _RESUME_FREE and k not in SECRET_OPTIONS}
        values["seed"] = self.seed
        values.update(resolved_settings(self.config.dataset_group, leave_out=_RESUME_FREE))
        # network_weights as states of versions where it was one path record it (so that those still resume)
        weights = values.get("network_weights")
        if isinstance(weights, tuple) and len(weights) < 2:
            values["network_weights"] = weights[0] if weights else None
        return {k: repr(v) for k, v in sorted(values.items())}

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None, timings: dict | None = None) -> Path | None:
        from .logger import TrainLogger
        from .metadata import minimum_metadata, progress_metadata, training_metadata
        from .optimizers import eval_mode, make_optimizer, optimizer_name, set_train_mode
        from .schedulers import follow_new_length, make_scheduler

        c = self.config
        if c.dataset_class:  # a wrong class path fails before the model loads
            from ..data.custom_dataset import load_dataset_class

            self.dataset_cls = load_dataset_class(c.dataset_class)
        torch.manual_seed(self.seed)
        self.parking = Parking(self.device)
        model = self._load_model(self.parking)
        merge_base_weights(model, c.base_weights, c.base_weights_multiplier)  # before the network, as sd-scripts
        net = self._make_network(model)
        keep_in_fp8(fp8_targets(model, c.fp8_base, c.fp8_base_unet), self.weight_dtype)  # after: adapters read W
        self.world.broadcast_parameters(net.parameters())
        if c.gradient_checkpointing:
            enable_checkpointing(model.unet, c.cpu_offload_checkpointing)
        ds, order, loader = self._dataset(model, cache=not c.debug_dataset)
        batches_per_epoch = len(ds.batches(1))
        if batches_per_epoch == 0:
            raise TrainingError("the dataset yields no batch")
        updates_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
        max_steps = c.max_train_epochs * updates_per_epoch if c.max_train_epochs else c.max_train_steps
        num_epochs = math.ceil(max_steps / updates_per_epoch)
        ds.set_schedule(max_steps, c.gradient_accumulation_steps)  # token_warmup_step counts optimizer steps
        if self.world.main:
            _log_dataset(ds)
        if c.debug_dataset:  # sd-scripts shows the batches instead of training
            from .debug_dataset import print_batches

            print_batches(ds, order, loader)
            return None
        self._place_for_training(model)
        save_every_epochs = c.save_every_n_epochs
        if c.save_n_epoch_ratio:  # train_network.py: at least save_n_epoch_ratio epoch saves over the run
            save_every_epochs = math.floor(num_epochs / c.save_n_epoch_ratio) or 1

        unet_lr = 0.0 if c.network_train_text_encoder_only else c.unet_lr
        te_lr = 0.0 if c.network_train_unet_only else c.text_encoder_lr
        groups = net.optimizer_param_groups(unet_lr=unet_lr, text_encoder_lr=te_lr, default_lr=c.learning_rate)
        optimizer = make_optimizer(c.optimizer_type, groups, c.learning_rate, c.optimizer_args)
        scaler = make_loss_scaler(self.device, c)
        if c.deepspeed:
            from .deepspeed_engine import offload_optimizer

            optimizer = offload_optimizer(optimizer, c)
        scheduler = make_scheduler(c.lr_scheduler, optimizer, max_steps, c.lr_warmup_steps,
                                   c.lr_scheduler_num_cycles, c.lr_scheduler_power, c.lr_scheduler_args,
                                   num_decay_steps=c.lr_decay_steps, timescale=c.lr_scheduler_timescale,
                                   min_lr_ratio=c.lr_scheduler_min_lr_ratio, scheduler_type=c.lr_scheduler_type)
        noise_scheduler = make_noise_scheduler("v_prediction" if model.v_parameterization else "epsilon",
                                               zero_terminal_snr=c.zero_terminal_snr)
        loss_options = {k: getattr(c, k) for k in _LOSS_OPTIONS if hasattr(c, k)}
        loss_options["v_parameterization"] = model.v_parameterization
        ctx = StepContext(model=model, noise_scheduler=noise_scheduler,
                          noise=NoiseOptions(**{k: getattr(c, k) for k in _NOISE_OPTIONS}),
                          loss=DiffusionLoss(noise_scheduler, LossOptions(**loss_options)), device=self.device,
                          weight_dtype=self.weight_dtype, autocast_dtype=self.autocast_dtype,
                          clip_skip=_text_clip_skip(model, c),
                          max_token_length=c.max_token_length,
                          # dataset_class batches bring no cached outputs: they fill this cache as they come
                          text_cache={} if c.cache_text_encoder_outputs and c.dataset_class else None,
                          world=self.world)
        validate = None
        if self.validation_dataset is not None:
            from .validation import Validator

            validate = Validator(ctx, self.validation_dataset, net,
                                 c.validation_seed if c.validation_seed is not None else self.seed,
                                 max_steps=c.max_validation_steps)
        train_text = not c.network_train_unet_only and (any(
            g["name"].startswith("text_encoder") for g in groups if "name" in g) or
            getattr(net, "text_encoder_rates", False))  # explore: the BASE rate learns through the text encoders
        if c.gradient_checkpointing and train_text:  # before compiling: turned on at the first step, it recompiles
            checkpoint_text_encoders(model.text_encoders)
        stop_text_at = (c.stop_text_encoder_training or  # steps; the GUI's percentage converted as it converts it
                        (math.ceil(max_steps * c.stop_text_encoder_training_pct / 100)
                         if c.stop_text_encoder_training_pct else None))
        if train_text and stop_text_at is not None and stop_text_at < max_steps and not any(
                not g.get("name", "").startswith("text_encoder") and g.get("lr", 1) for g in groups):
            stop = ("stop_text_encoder_training" if c.stop_text_encoder_training else "stop_text_encoder_training_pct")
            raise TrainingError(f"{stop} = {getattr(c, stop)} stops the text encoders at step {stop_text_at} of "
                                f"{max_steps}, and the U-Net trains nothing (network_train_text_encoder_only, or "
                                "unet_lr 0): nothing would train after it; train the U-Net too, or leave the stop out")

        settings = self._settings()
        # the data too: a resume from a state of a dataset with other batches would take other images
        settings["batches per epoch (the dataset)"] = repr(batches_per_epoch)
        digest = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]
        progress = Progress(config_digest=digest, seed=self.seed, settings=settings, max_steps=max_steps)
        if self.resume_folder:
            progress = load_state(self.resume_folder, net, None if c.deepspeed else optimizer, scheduler,
                                  progress.config_digest, progress.settings, scaler=scaler, max_steps=max_steps,
                                  epoch_size=(batches_per_epoch, c.gradient_accumulation_steps))
        engine = None
        if c.deepspeed:  # after the resumed adapters are in place: the engine copies them as its master weights
            from .deepspeed_engine import DeepSpeedEngine

            engine = self.engine = DeepSpeedEngine(c, self.world, net, model, optimizer,
                                                   train_unet=not c.network_train_text_encoder_only,
                                                   train_text=train_text)
            if c.resume:
                engine.load_state(self.resume_folder)
        if self.resume_folder:
            follow_new_length(scheduler)  # a resume with more steps: the lr schedule of the new length
            set_train_mode(optimizer, True)  # schedule-free: a state an earlier lorakit saved in eval mode
        full_weights = engine.full_weights if engine else contextlib.nullcontext
        progress = initial_progress(c, progress, updates_per_epoch, max_steps)
        main = self.world.main
        if main:
            self.names.check_kinds(states=c.save_state or c.save_state_on_train_end,
                                   samples=bool(c.sample_prompts))
            # from a killed run's saves and sample images (a missing folder has none)
            for left in [*remove_stale_temporaries(self.names.dir), *remove_stale_temporaries(self.names.sample_dir())]:
                log.info("removed %s, left by a run that was stopped while saving", left)
            self.names.dir.mkdir(parents=True, exist_ok=True)
            text = to_toml(c, leave_out=SECRET_OPTIONS)  # no secrets in the output folder
            atomic_write(self.names.config_file(), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            _log_schedule(ds, self.validation_dataset, batches_per_epoch, num_epochs, self._batch_sizes(ds),
                          c.gradient_accumulation_steps, max_steps)

        # by the main process only, which saves: the model file's hashes read it whole; the rates file carries its own
        base_meta = None if self.explore or not main else training_metadata(
            c, kind=model.kind, v_parameterization=model.v_parameterization, dataset=ds,
            optimizer_name=optimizer_name(optimizer), num_epochs=num_epochs, max_train_steps=max_steps,
            session_id=uuid.uuid4().hex, started_at=time.time(),
            model_path=str(c.pretrained_model_name_or_path), resolution=_resolution(c),
            validation_dataset=self.validation_dataset)
        logger = TrainLogger(c, total=max_steps, initial=progress.global_step, quiet=not main)
        sampler = _Sampler(c, model, net, self.names, self.seed, self.parking, enabled=main,
                           every_process=engine is not None and engine.samples_on_every_process)

        def save(path: Path, epoch: int, step: int) -> None:
            """The adapter file, by the main process; every process calls it (ZeRO-3 gathers the adapters). A
            schedule-free optimizer is in eval mode (its averaged weights) for it, for samples and for validation,
            as sd-scripts' optimizer_eval_fn."""
            with full_weights(), eval_mode(optimizer):
                if main:
                    log.info("saving checkpoint: %s", path)
                    if self.explore:
                        _save_rates(net, path, c.network_weights)
                        return
                    meta = (minimum_metadata(base_meta) if c.no_metadata  # sd-scripts' minimum keys and modelspec
                            else progress_metadata(base_meta, epoch=epoch, step=step, title=None))
                    _save_adapter(net, path, self.save_dtype, meta, drop_unet=c.network_train_text_encoder_only)

        def write_state(folder: Path) -> None:
            """A state folder: by the main process, or by all of them with deepspeed (each writes its slices). A
            schedule-free optimizer stays in train mode, so the state holds the weights it trains and a resume goes
            on from them bit for bit (sd-scripts saves its averaged weights, which give them back to float noise)."""
            if main:
                log.info("saving state: %s", folder)
            if engine is not None:
                engine.save_state(folder, scheduler, progress)
            elif main:
                save_state(folder, net.state_dict(), optimizer, scheduler, progress, scaler=scaler)

        def draw(step: int, epoch: int | None = None) -> None:
            with eval_mode(optimizer):
                logger.samples(sampler.draw(step, epoch))

        def evaluate() -> float:
            with eval_mode(optimizer):
                return validate()

        uploads = self.uploads  # huggingface_repo_id: each save is uploaded once written

        def checkpoint(kind: str, number: int, epoch: int) -> None:
            """A step or epoch save: the adapter, its state with save_state, their uploads with huggingface_repo_id,
            and the save_last_n_* clean-up."""
            by_step = kind == "step"
            every = c.save_every_n_steps if by_step else save_every_epochs
            keep, keep_state = ((c.save_last_n_steps, c.save_last_n_steps_state) if by_step
                                else (c.save_last_n_epochs, c.save_last_n_epochs_state))
            keep_state = keep_state or keep  # sd-scripts: the *_state count, else the model files' own
            prune = self.names.prune_steps if by_step else self.names.prune_epochs
            path = self.names.step(number) if by_step else self.names.epoch(number)
            if main and uploads is not None and (keep or keep_state):
                uploads.wait()  # the clean-up below may remove an older save whose upload is still queued
            save(path, epoch, progress.global_step)
            if main:
                if uploads is not None:
                    uploads.upload(path)
                prune(number, every, keep)
            if c.save_state:
                state = self.names.step_state(number) if by_step else self.names.epoch_state(number)
                write_state(state)
                if main:
                    if uploads is not None:
                        uploads.upload_state(state)
                    prune(number, every, keep_state, state=True)

        if c.sample_at_first:  # a resumed run too, as sd-scripts: what it goes on from (the draw keeps every RNG)
            draw(progress.global_step, 0)  # named as epoch 0, as sd-scripts' sample_images(..., 0, 0, ...) names it
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        if c.fused_backward_pass:  # after resume: loading a state replaces the optimizer's group dicts
            install_fused_step(optimizer, c.max_grad_norm, self.world)
        if c.torch_compile and c.dynamo_backend != "no":  # what accelerate.prepare() gets in sd-scripts: what trains
            compile_models(([] if c.network_train_text_encoder_only else [model.unet])
                           + (list(model.text_encoders) if train_text else []), c.dynamo_backend)
        clock = ctx.timings
        # sd-scripts' sample_images_common: with sample_every_n_epochs, sample_every_n_steps is ignored
        sample_every_steps = None if c.sample_every_n_epochs else c.sample_every_n_steps
        first_epoch = progress.epoch
        if progress.global_step >= max_steps:  # a resume from a state at this run's last step, part-way or not
            first_epoch = num_epochs + 1  # through its epoch (sd-scripts refuses it: max_train_steps > initial_step)
            if main:
                log.info("resume=%s: the state is at step %d, this run's last: nothing is left to train, the final "
                         "adapter is the state's", self.resume_folder, progress.global_step)
        try:
            for epoch in range(first_epoch, num_epochs + 1):
                if main:
                    log.info("epoch %d/%d", epoch, num_epochs)
                start = progress.step_in_epoch if epoch == progress.epoch else 0
                order.set_position(epoch, start)
                micro = 0
                last = time.perf_counter()
                for index, batch in enumerate(loader, start=start):
                    began = time.perf_counter()
                    clock["data"] += began - last
                    step_seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % (2**63)
                    torch.manual_seed(step_seed)  # dropouts in the adapters
                    generator = torch.Generator(device=self.device).manual_seed(step_seed)
                    text_now = train_text and (stop_text_at is None or progress.global_step < stop_text_at)
                    loss = batch_loss(ctx, batch, generator, text_now)
                    if self.explore:  # sd-scripts: the rates' total as a penalty, negatives 10x
                        loss = loss + c.application_loss_weight * net.penalty()
                    if not torch.isfinite(loss):
                        raise TrainingError(f"the loss became {loss.item()} at step {progress.global_step + 1} "
                                            f"(epoch {epoch}); training stopped, the last save is kept. Lower the "
                                            "learning rate, or use mixed_precision bf16 instead of fp16")
                    backward_start = time.perf_counter()
                    clock["forward"] += backward_start - began
                    micro += 1
                    step_loss = loss.detach() if micro == 1 else step_loss + loss.detach()
                    boundary = micro >= c.gradient_accumulation_steps or index + 1 == batches_per_epoch
                    if engine is not None:  # the engine also averages, clips and steps at the boundary
                        engine.backward(loss, boundary)
                    else:
                        scaler.scale(loss / c.gradient_accumulation_steps).backward()
                    clock["backward"] += time.perf_counter() - backward_start
                    clock["batches"] += 1
                    if not boundary:
                        last = time.perf_counter()
                        continue
                    micro_done, micro = micro, 0
                    optimizer_start = time.perf_counter()
                    stepped = engine.step_applied if engine is not None else True  # DeepSpeed: False on overflow
                    if engine is None and not c.fused_backward_pass:  # fused: backward() stepped each parameter
                        self.world.average_gradients(trainable)
                        scaler.unscale_(optimizer)  # (a disabled scaler does nothing here)
                        if c.max_grad_norm and not self.explore:  # sd-scripts' appl_weights does not clip
                            torch.nn.utils.clip_grad_norm_(trainable, c.max_grad_norm)
                        stepped = scaler.step_and_update(optimizer)
                    if stepped:  # fp16's skipped step holds the schedule; the step still counts, as in sd-scripts
                        scheduler.step()
                    if engine is None:
                        optimizer.zero_grad(set_to_none=True)
                    progress.global_step += 1
                    progress.step_in_epoch = index + 1
                    # (adapters scaled, mean and max norm), logged as sd-scripts does
                    max_norm = net.apply_max_norm_regularization(c.scale_weight_norms) if c.scale_weight_norms else None
                    step = progress.global_step
                    if sample_every_steps and step % sample_every_steps == 0:  # before the step's logs, as
                        drawing = time.perf_counter()  # sd-scripts: wandb puts the samples in that step's row
                        draw(step)
                        optimizer_start += time.perf_counter() - drawing  # (not counted as the optimizer's time)
                    # the step's loss: the mean over its accumulated batches (sd-scripts records every one)
                    logger.step(step_loss.item() / micro_done, scheduler.get_last_lr(), step, epoch,
                                groups=optimizer.param_groups, max_norm=max_norm)
                    if validate and c.validate_every_n_steps and step % c.validate_every_n_steps == 0:
                        logger.validation("step", evaluate(), step, epoch)
                    clock["optimizer_and_log"] += time.perf_counter() - optimizer_start
                    if c.save_every_n_steps and step % c.save_every_n_steps == 0:  # the last step too, as sd-scripts
                        checkpoint("step", step, epoch)
                    if stop_at_step is not None and step >= stop_at_step:
                        if not (c.save_every_n_steps and step % c.save_every_n_steps == 0 and c.save_state):
                            write_state(self.names.step_state(step))
                        return None
                    if step >= max_steps:
                        break
                    last = time.perf_counter()
                if progress.step_in_epoch >= batches_per_epoch:  # not when max_steps ended it part-way: a state
                    progress.epoch, progress.step_in_epoch = epoch + 1, 0  # saved now resumes (longer) from there
                if validate and (c.validate_every_n_epochs is None or epoch % c.validate_every_n_epochs == 0):
                    logger.validation("epoch", evaluate(), progress.global_step, epoch)
                logger.epoch_end(epoch)  # also the last, part-way epoch, as sd-scripts logs it
                if progress.global_step >= max_steps:
                    break
                if save_every_epochs and epoch % save_every_epochs == 0 and epoch < num_epochs:
                    checkpoint("epoch", epoch, epoch)
                if c.sample_every_n_epochs and epoch % c.sample_every_n_epochs == 0:
                    draw(progress.global_step, epoch)
        finally:
            logger.close()
            if timings is not None:
                timings.update(clock)
        final = self.names.final()
        save(final, min(progress.epoch, num_epochs), progress.global_step)
        if uploads is not None:
            uploads.upload(final, force_sync=True)  # as sd-scripts: the last upload does not wait in the background
        self.world.barrier()  # the other processes return once the main one has written the file
        if main:
            log.info("model saved.")
        if c.save_state or c.save_state_on_train_end:
            write_state(self.names.final_state())
            if main and uploads is not None:
                uploads.upload_state(self.names.final_state())
        if c.sample_every_n_steps or c.sample_every_n_epochs:
            draw(progress.global_step, min(progress.epoch, num_epochs) if c.sample_every_n_epochs else None)
        return final


class _Sampler:
    """Sample images, drawn by the main process; ``every_process``: by all of them in step (DeepSpeed ZeRO-3, whose
    forward needs every process's slice of the weights), saved by the main one."""

    def __init__(self, config, model, net, names: OutputNames, seed: int, parking: Parking, enabled: bool = True,
                 every_process: bool = False):
        self.config, self.model, self.net, self.names, self.seed = config, model, net, names, seed
        self.parking = parking  # the VAE and text encoders come back to the device for the draw
        self.prompts, self.last_step, self.write = None, None, enabled
        if config.sample_prompts and (enabled or every_process):
            from ..models.sample import check_sampler
            from .sample_prompts import read_sample_prompts

            self.prompts = read_sample_prompts(config.sample_prompts)  # bad files fail before training
            try:
                check_sampler(config.sample_sampler)
            except ValueError as e:
                raise ValueError(f"sample_sampler: {e}") from None

    def draw(self, step: int, epoch: int | None = None) -> list:
        """Samples at this step; `epoch` given (a draw of sample_every_n_epochs): named by epoch, as sd-scripts.
        Returns each prompt's text and image (none when nothing was drawn)."""
        if not self.prompts or step == self.last_step:  # the end of training may repeat a step
            return []
        self.last_step = step
        from .sample_prompts import draw_samples

        unet_mode = self.model.unet.training
        self.net.eval()
        self.model.unet.eval()
        rng = torch.get_rng_state()
        try:
            with self.parking.borrowed(self.model.vae, *self.model.text_encoders):
                return draw_samples(self.model, self.prompts, self.names.sample_dir(), self.names.output_name,
                                    step, default_sampler=self.config.sample_sampler,
                                    clip_skip=_text_clip_skip(self.model, self.config), base_seed=self.seed,
                                    write=self.write,
                                    epoch=epoch)
        finally:
            torch.set_rng_state(rng)
            self.net.train()
            self.model.unet.train(unet_mode)


def _log_dataset(ds) -> None:
    """sd-scripts' dataset lines (DreamBoothDataset): the images found in each folder, the totals with repeats."""
    for subset, count in zip(ds.subsets, ds.image_counts):
        where = f"metadata file {subset.metadata_file}" if subset.metadata_file else f"directory {subset.image_dir}"
        kind = "regularisation images, " if subset.is_reg else ""
        log.info("found %s contains %d image files (%s%d repeats)", where, count, kind, subset.num_repeats)
    log.info("%d train images with repeating.", ds.num_train_images)
    log.info("%d reg images.", ds.num_reg_images)


def _log_schedule(ds, validation, batches_per_epoch: int, num_epochs: int, batch_sizes: list[int],
                  accumulation: int, max_steps: int) -> None:
    """sd-scripts' "running training" block (train_network.py), in its words: GUIs and monitors read these lines."""
    lines = [("num train images * repeats / 学習画像の数×繰り返し回数: ", ds.num_train_images),
             ("num validation images * repeats / 学習画像の数×繰り返し回数: ",
              validation.num_train_images if validation is not None else 0),
             ("num reg images / 正則化画像の数: ", ds.num_reg_images),
             ("num batches per epoch / 1epochのバッチ数: ", batches_per_epoch),
             ("num epochs / epoch数: ", num_epochs),
             ("batch size per device / バッチサイズ: ", ", ".join(map(str, batch_sizes))),
             ("gradient accumulation steps / 勾配を合計するステップ数 = ", accumulation),
             ("total optimization steps / 学習ステップ数: ", max_steps)]
    log.info("running training / 学習開始")
    for text, value in lines:
        log.info("  %s%s", text, value)


def _unet_adapters(path, arch: str | None) -> dict:
    """network_weights' tensors for a network_train_unet_only run, under kohya names (other trainers' layouts read
    as the loaders read them): its text-encoder adapters left out (one log line says how many), as sd-scripts'
    apply_to(apply_text_encoder=False) builds none and load_weights ignores them."""
    from ..network.load import kohya_tensors, read_adapter_tensors
    from ..network.names import TE1_PREFIX, TE2_PREFIX, TE_PREFIX

    tensors, _, where = read_adapter_tensors(path)
    tensors, where, _ = kohya_tensors(tensors, arch, where)
    unet = {k: v for k, v in tensors.items() if not k.startswith((TE_PREFIX, TE1_PREFIX, TE2_PREFIX))}
    if len(unet) < len(tensors):
        log.info("network_weights=%s: %d text-encoder tensor(s) (lora_te*) left out: network_train_unet_only trains "
                 "the U-Net's adapters only", where, len(tensors) - len(unet))
    return unet


def _load_network_weights(net, source, where: str, unet, text_encoders) -> None:
    """network_weights into the network the options built, its names in either U-Net style (SDXL: SGM or
    diffusers), mapped to the network's as load_network and sd-scripts' load_weights read them."""
    from ..network.kohya import KohyaNetwork
    from ..network.load import kohya_tensors, read_adapter_tensors
    from ..network.names import NameIndex

    tensors, where, _ = kohya_tensors(read_adapter_tensors(source)[0], net.arch, where)  # OneTrainer OMI, ...
    index = NameIndex.for_sd(unet, text_encoders or (), net.arch) if net.arch is not None else None
    try:
        _, unexpected = KohyaNetwork.wrap(net, index).load_state_dict(tensors, strict=False)  # its adapters are net's
    except RuntimeError as error:  # torch's message: one line per tensor whose shape differs
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise TrainingError(f"network_weights={where}: {len(lines)} tensor(s) have other shapes than this network's "
                            f"(e.g. {lines[0] if lines else error}); set network_dim, conv_dim and network_args as "
                            "the file was trained, or use dim_from_weights") from None
    if unexpected:
        raise TrainingError(f"network_weights={where}: {len(unexpected)} tensor(s) match no adapter of this network "
                            f"(e.g. {unexpected[0]}); use dim_from_weights for its shapes")


def _unbind_unconstrained_rotations(net, path) -> None:
    """dim_from_weights: a Diag-OFT/BOFT file trained without a constraint stores alpha just above its blocks' norm
    (A1111 reads 0 as no rotation), which a network built from the file alone takes as its bound. Its training
    arguments (ss_network_args: no constraint, or 0) tell the two apart, and the run goes on unconstrained."""
    import json

    from ..algos.oft_base import OrthogonalAdapter
    from ..algos.options import ALIASES
    from ..formats.safetensors_io import read_metadata

    if not str(path).endswith(".safetensors"):
        return
    try:
        args = json.loads(read_metadata(path).get("ss_network_args", "null"))
    except ValueError:
        return
    if not isinstance(args, dict):
        return
    args = {ALIASES.get(key, key): value for key, value in args.items()}  # 'constrain' binds in LyCORIS too
    if str(args.get("algo", "")).lower().replace("_", "-") not in {"diag-oft", "oft", "boft"}:
        return
    try:
        constraint = float(args.get("constraint") or 0)
    except (TypeError, ValueError):
        return
    if constraint == 0:
        for _, adapter in net.adapters():
            if isinstance(adapter, OrthogonalAdapter):
                adapter.bound = 0.0


def _save_adapter(net, path: Path, dtype, metadata: dict, drop_unet: bool) -> None:
    """The adapter file (atomic). Text-encoder-only runs leave out the U-Net adapters they never trained."""
    from ..formats import add_hashes, prepare_tensors
    from ..network.names import split_key

    tensors = net.state_dict()
    if drop_unet:
        unet = {name for name, entry in net.entries.items() if entry.component == "unet"}
        tensors = {k: v for k, v in tensors.items() if split_key(k)[0] not in unet}
    tensors = prepare_tensors(tensors, dtype)
    _write_tensors(path, tensors, add_hashes(tensors, metadata) if metadata else None)


def _write_tensors(path: Path, tensors: dict, metadata: dict | None) -> None:
    """A .safetensors file with its metadata, or (.ckpt / .pt, as sd-scripts writes them) a plain state dict, whose
    format has no metadata: left out without a note on every save, as sd-scripts does."""
    from ..formats.safetensors_io import is_torch_name, save_tensors

    save_tensors(tensors, path, None if is_torch_name(path) else metadata)


def _save_rates(rates, path: Path, sources) -> None:
    """lorakit explore's file: the rates under sd-scripts' key `weights` (float32), with the layout and each
    network's rates by block in the metadata (sd-scripts writes none; no ss_* or modelspec keys: it is not a
    network); printed as sd-scripts prints them."""
    import json

    tensors = {k: v.detach().float().contiguous() for k, v in rates.state_dict().items()}
    meta = {"lorakit_application_layout": rates.layout.key,
            "lorakit_application_rates": json.dumps(
                [{"network": str(src), "rates": vals} for src, vals in zip(sources, rates.values())])}
    _write_tensors(path, tensors, meta)
    print(rates.describe([Path(s).name for s in sources]), flush=True)


# options of a network's training that explore (which trains only the rates, at learning_rate) does not use
_NETWORK_TRAINING_OPTIONS = ("unet_lr", "text_encoder_lr", "network_dim", "network_alpha", "network_args",
                             "network_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                             "loraplus_text_encoder_lr_ratio")


def _check_explore(config) -> None:
    """What lorakit explore needs and what it cannot combine with."""
    if not config.network_weights:
        raise OptionError("network_weights names no adapter file: give the trained network(s) whose application "
                          "rates to search")
    for name, why in (("deepspeed", "the rates are one small vector"),
                      ("scale_weight_norms", "the networks are frozen"),
                      ("network_train_text_encoder_only", "the rates act on every block"),
                      ("dim_from_weights", "the networks are read whole from their files")):
        if getattr(config, name):
            raise OptionError(f"{name} cannot be used ({why})")
    names = OutputNames(config.output_dir, config.output_name, config.save_model_as)
    for path in config.network_weights:
        if names.holds(path):
            raise OptionError(f"network_weights {path}: is a file this run would write its rates to (output_dir "
                              f"{config.output_dir}, output_name {config.output_name or '(none)'}); choose another "
                              "output_name or output_dir, or the adapter would be overwritten")
    unused = [name for name in _NETWORK_TRAINING_OPTIONS if name in config.given]
    if unused:
        log.warning("%s: options of a network's training, not used by lorakit explore (the networks are read whole "
                    "from network_weights and only the rates train, at learning_rate %g)", ", ".join(unused),
                    config.learning_rate)


def _resolution(config) -> tuple[int, int] | None:
    """The training resolution for the metadata; None when the data sets none (a fine-tuning dataset at its
    metadata's train_resolution buckets): ss_resolution is then "None" and modelspec the model's default, as in
    sd-scripts."""
    reso = config.resolution
    if reso is None and config.dataset_group is not None and config.dataset_group.datasets:
        reso = config.dataset_group.datasets[0].resolution
    if isinstance(reso, (list, tuple)):
        return int(reso[0]), int(reso[-1])
    if reso is None and (config.in_json is not None or config.dataset_group is not None):
        return None
    return (int(reso), int(reso)) if reso else (512, 512)

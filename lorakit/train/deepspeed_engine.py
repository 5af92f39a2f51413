"""deepspeed = true (sd-scripts' library/deepspeed_utils.py): a DeepSpeed engine steps the network.

sd-scripts hands its options to DeepSpeed through accelerate; lorakit builds the same engine itself:
- zero_stage: ZeRO over the processes. Stage 1 partitions the optimizer states (and fp32 master weights), stage 2
  the gradients too. Stage 3 partitions the parameters as well, and then the engine also holds the U-Net and the
  text encoders the adapters train through, as sd-scripts wraps them: their frozen weights are partitioned too,
  each process keeping 1/N of them and gathering a layer's weights only for its forward.
- offload_optimizer_device / offload_param_device: the optimizer states / partitioned parameters in CPU memory or
  on NVMe. With a CPU-offloaded optimizer AdamW steps with DeepSpeed's CPU Adam, as accelerate swaps it in.
- mixed_precision fp16 / bf16: DeepSpeed's own, the trained weights in 16 bits and fp32 master copies in the
  optimizer; fp16 scales the loss dynamically starting from 2^0, as sd-scripts sets it.
- Gradient accumulation, the averaging over processes and max_grad_norm clipping happen in the engine; a step it
  skips for fp16 overflow reports ``step_applied`` False.

The data parallelism stays lorakit's (distributed.py): every process builds the global batch and trains on its
slice, so the batches, noise and timesteps are those of a run without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from .state import Progress, StateError, save_state

__all__ = ["DeepSpeedEngine", "require_deepspeed", "engine_config", "offload_optimizer"]

_INSTALL = 'DS_BUILD_OPS=0 pip install deepspeed (or pip install "lorakit[deepspeed]")'
_TAG = "state"  # the one checkpoint tag in a state folder's deepspeed/ sub-folder


def require_deepspeed(config):
    """The deepspeed module, with a clear error when it is missing or cannot do what the options ask."""
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"deepspeed = true needs the deepspeed package ({e}); install it with {_INSTALL}") from e
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if config.mixed_precision == "fp16" and not accelerator.is_fp16_supported():
        raise RuntimeError(f"mixed_precision 'fp16' with deepspeed: DeepSpeed's {accelerator.device_name()} "
                           "accelerator does not support fp16 here; use 'bf16' or 'no'")
    if config.mixed_precision == "bf16" and not accelerator.is_bf16_supported():
        raise RuntimeError(f"mixed_precision 'bf16' with deepspeed: DeepSpeed's {accelerator.device_name()} "
                           "accelerator does not support bf16 here; use 'fp16' or 'no'")
    if "nvme" in (config.offload_optimizer_device, config.offload_param_device):
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise RuntimeError("offload to 'nvme' needs DeepSpeed's async_io op, which cannot be built here (it "
                               "needs libaio: apt install libaio-dev); use 'cpu' instead")
    return deepspeed


def engine_config(config, world_size: int) -> dict:
    """The DeepSpeed config sd-scripts builds (DeepSpeedPlugin and prepare_deepspeed_plugin)."""
    c = config
    zero: dict = {"stage": c.zero_stage, "stage3_gather_16bit_weights_on_model_save": c.zero3_save_16bit_model}
    for kind in ("optimizer", "param"):
        device = getattr(c, f"offload_{kind}_device")
        if device:
            zero[f"offload_{kind}"] = {"device": device, "nvme_path": getattr(c, f"offload_{kind}_nvme_path"),
                                       "pin_memory": torch.cuda.is_available()}
    out = {
        "train_micro_batch_size_per_gpu": c.train_batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "train_batch_size": c.train_batch_size * c.gradient_accumulation_steps * world_size,
        "gradient_clipping": float(c.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # any torch optimizer (Lion, Prodigy, ...)
        "zero_force_ds_cpu_optimizer": False,  # offload_optimizer_for: AdamW is swapped, the others step on CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if c.mixed_precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 0}  # sd-scripts: "preventing overflow"
        if (c.full_fp16 or c.fp16_master_weights_and_gradients) and c.zero_stage == 2 \
                and c.offload_optimizer_device == "cpu":
            out["fp16"]["fp16_master_weights_and_grads"] = True
    elif c.mixed_precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


def offload_optimizer(optimizer: torch.optim.Optimizer, config) -> torch.optim.Optimizer:
    """With offload_optimizer_device 'cpu', AdamW steps with DeepSpeed's CPU Adam (accelerate's swap); other
    optimizers step as they are on the CPU copies."""
    if config.offload_optimizer_device != "cpu" or type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"], adamw_mode=isinstance(optimizer, torch.optim.AdamW))


@contextlib.contextmanager
def _tensors_print_short():
    """Stage 3's optimizer formats every parameter of the engine's module into a log message, whatever the log
    level (an f-string of its __init__'s locals(): parameter names keyed by the parameters), 2.3 s for the 1334
    small parameters of demo:tiny-sd with its network. Meanwhile tensors print as their first and last values
    (0.5 s)."""
    options = torch._tensor_str.PRINT_OPTS
    threshold, edgeitems = options.threshold, options.edgeitems
    torch.set_printoptions(threshold=1, edgeitems=1)
    try:
        yield
    finally:
        torch.set_printoptions(threshold=threshold, edgeitems=edgeitems)


class _Trained(torch.nn.Module):
    """Stage 3's engine module: the network and the models it trains through (sd-scripts' DeepSpeedWrapper)."""

    def __init__(self, network, models: dict):
        super().__init__()
        self.network = network
        self.models = torch.nn.ModuleDict({k: m for k, m in models.items() if m is not None})


class DeepSpeedEngine:
    """The engine over the network (stages 0-2) or the network and the models it trains through (stage 3)."""

    def __init__(self, config, world, network, model, optimizer, *, train_unet: bool, train_text: bool):
        ds = require_deepspeed(config)
        self.config, self.world, self.network = config, world, network
        self.stage = config.zero_stage
        if world.size > 1 and self.stage >= 1:
            from .optimizers import GLOBAL_STATISTICS

            name = type(optimizer).__name__
            if name in GLOBAL_STATISTICS:
                raise RuntimeError(f"optimizer {name} cannot train with DeepSpeed zero_stage {self.stage} on "
                                   f"{world.size} processes: its step size comes from sums over all the weights, "
                                   "and each process holds only its slice of them; use zero_stage 0")
        for key, value in (("RANK", world.rank), ("LOCAL_RANK", world.rank), ("WORLD_SIZE", world.size)):
            os.environ.setdefault(key, str(value))  # a single process without a launcher: DeepSpeed reads these
        ds.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False)
        module = network
        if self.stage == 3:
            from deepspeed.utils import set_z3_leaf_module

            # The adapters run through their module call (Network.apply(hooks=True)), so the engine's hooks gather
            # their parameters for the forward and again for the backward.
            models = {"unet": model.unet if train_unet else None}
            if train_text:
                models.update({f"text_encoder{i + 1}": te for i, te in enumerate(model.text_encoders)})
                for te in model.text_encoders:  # CLIP's embeddings read their children's weight shapes
                    for m in te.modules():
                        if type(m).__name__.endswith("Embeddings"):
                            set_z3_leaf_module(m, True)
            module = _Trained(network, models)
        self._linear = torch.nn.functional.linear  # stage 3 replaces it for the whole process (close() puts it back)
        try:
            with _tensors_print_short():
                self.engine, self.optimizer, _, _ = ds.initialize(model=module, optimizer=optimizer,
                                                                  config=engine_config(config, world.size),
                                                                  dist_init_required=False)
        except BaseException:
            torch.nn.functional.linear = self._linear
            raise

    def close(self) -> None:
        """Leaves the process as it was before the engine, for a next run in it (the web UI's, a notebook's):
        DeepSpeed's own teardown (its hooks, its registry of the module's names); torch's F.linear, which stage 3
        replaces with its own for good ("this will persist unless manually reset"); and stage 3's module stack,
        a global list that keeps the engine's module, the models with it, after the teardown."""
        try:
            self.engine.destroy()
        finally:
            torch.nn.functional.linear = self._linear
            offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
            stack = getattr(offload, "FWD_MODULE_STACK", None)
            if isinstance(stack, list):
                stack[:] = [m for m in stack if m is not self.engine.module]

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """The micro-batch's backward (the loss divided by gradient_accumulation_steps, as without DeepSpeed);
        at a ``boundary`` the engine averages the gradients, clips them and steps the optimizer."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)
        self.engine.step()

    @property
    def step_applied(self) -> bool:
        """Whether the last boundary's optimizer step changed the weights: False when fp16's dynamic loss scale
        skipped it for overflowing gradients, whose step then holds the lr schedule (as accelerate's
        AcceleratedScheduler does in sd-scripts, reading the optimizer's overflow flag)."""
        return self.engine.was_step_applied()

    def full_weights(self):
        """A block in which the adapters' weights are whole on every process (stage 3 gathers them; every process
        must enter it together)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.network.parameters()))

    @property
    def samples_on_every_process(self) -> bool:
        """Stage 3 on several processes: a forward needs every process (each holds a slice of the weights)."""
        return self.stage == 3 and self.world.active

    # ----- state folders ------------------------------------------------------------------------------------------
    def save_state(self, folder: Path, scheduler, progress: Progress) -> None:
        """A state folder as save_state writes it, with the engine's checkpoint (optimizer slices, master weights,
        loss scale) in deepspeed/ instead of the optimizer state. Every process takes part: each writes its slices
        into the main process's staging folder."""
        with self.full_weights():  # stage 3: copies, the gathered weights are released on leaving
            tensors = {k: v.clone() for k, v in self.network.state_dict().items()} if self.world.main else None
        if self.world.main:
            save_state(folder, tensors, None, scheduler, progress, deepspeed=(self.stage, self._checkpoint))
        else:
            self._checkpoint(None)

    def _checkpoint(self, where: Path | None) -> None:
        where = self.world.share(where)  # the main process's staging folder
        self.engine.save_checkpoint(str(where), tag=_TAG, exclude_frozen_parameters=True)
        self.world.barrier()  # every slice is written before the main process renames the folder

    def load_state(self, folder: Path) -> None:
        """The engine's part of a state folder (after state.load_state restored the adapters and the scheduler)."""
        folder = Path(folder)
        if not (folder / "deepspeed" / _TAG).is_dir():
            raise StateError(f"resume={folder}: the state was saved without deepspeed (no deepspeed/{_TAG} folder); "
                             "resume it with deepspeed = false")
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag=_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise StateError(f"resume={folder}: DeepSpeed could not read deepspeed/{_TAG} (saved with a different "
                             "zero_stage or number of processes?)")

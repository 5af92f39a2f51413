"""Progress and logs of a run: a progress bar with loss, lr, it/s and ETA; TensorBoard (``logging_dir``) and
wandb (``log_with``; offline unless WANDB_MODE says otherwise), with sd-scripts' metric names.

As sd-scripts' accelerator_logging: TensorBoard's x is the global step, or the epoch for the per-epoch metrics;
wandb gets no step (its step must only grow) but ``global_step`` and ``epoch`` keys in every log, hidden metrics
to chart against."""

from __future__ import annotations

import os
import time

from .tracker_config import loggable_config, tracker_init_kwargs

__all__ = ["TrainLogger", "lr_logs", "max_norm_logs", "missing_tracker_packages", "tensorboard_folder"]


def missing_tracker_packages(config) -> list[str]:
    """The messages for trackers the run asks for whose package is not installed (checked before the model loads)."""
    import importlib.util

    log_with = config.log_with or ("tensorboard" if config.logging_dir else None)
    wanted = {"tensorboard": "logging_dir needs the tensorboard package: pip install tensorboard",
              "wandb": "log_with=wandb needs the wandb package: pip install wandb"}
    return [message for package, message in wanted.items()
            if log_with in (package, "all") and importlib.util.find_spec(package) is None]


class TrainLogger:
    def __init__(self, config, total: int, initial: int = 0, quiet: bool = False):
        """``quiet``: no bar, no log files (the other processes of a multi-process run)."""
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []  # this epoch's steps, for loss/epoch_average
        self.writers = []
        self.quiet = quiet
        self.global_step = initial  # the last step logged, for the per-epoch logs' global_step
        self._bar = None if quiet else _progress_bar(total, initial)
        log_with = None if quiet else config.log_with or ("tensorboard" if config.logging_dir else None)
        init_kwargs = tracker_init_kwargs(config) if log_with else {}
        run_config = loggable_config(config)
        if log_with in ("tensorboard", "all"):
            if not config.logging_dir:
                raise ValueError("log_with=tensorboard needs logging_dir (the folder the event files go to)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("logging_dir needs the tensorboard package: pip install tensorboard") from None
            writer = SummaryWriter(tensorboard_folder(config), **init_kwargs.get("tensorboard", {}))
            if run_config is not None:  # what accelerate's TensorBoardTracker.store_init_configuration writes
                writer.add_hparams({k: v for k, v in run_config.items() if v is not None}, metric_dict={})
            self.writers.append(_TensorBoard(writer))
        if log_with in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise ValueError("log_with=wandb needs the wandb package: pip install wandb") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            settings = {"project": config.log_tracker_name or "network_train", "dir": config.logging_dir,
                        **init_kwargs.get("wandb", {})}
            run = wandb.init(config=run_config, **settings)
            self.writers.append(_Wandb(run))

    def step(self, loss: float, lrs: list[float], step: int, epoch: int, groups: list[dict] | None = None,
             max_norm: tuple[int, float, float] | None = None) -> None:
        """One optimizer step: `lrs` the scheduler's last lrs, `groups` the optimizer's param_groups (for the lr
        metrics' names and D-Adaptation/Prodigy's d, see lr_logs), `max_norm` what scale_weight_norms' regularisation
        returned (adapters scaled, mean and maximum norm)."""
        self.losses.append(loss)
        self.epoch_losses.append(loss)
        window = self.losses[-100:]  # sd-scripts shows the mean over the last epoch's steps; 100 is steadier
        average = sum(window) / len(window)
        logs = {"loss/current": loss, "loss/average": average, **max_norm_logs(max_norm), **lr_logs(lrs, groups)}
        self.global_step = step
        self._log(logs, step, epoch)
        shown = {} if max_norm is None else {"Keys Scaled": max_norm[0], "Average key norm": f"{max_norm[1]:.4g}"}
        if self._bar is not None:
            self._bar.set_postfix(**shown, avr_loss=f"{average:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch)
            self._bar.update(1)
        elif not self.quiet:
            extra = "".join(f" {key.lower().replace(' ', '_')} {value}" for key, value in shown.items())
            print(f"step {step} epoch {epoch} loss {loss:.4f} avr_loss {average:.4f} lr {lrs[0]:.2e}{extra}",
                  flush=True)

    def epoch_end(self, epoch: int) -> None:
        """sd-scripts' loss/epoch_average at each epoch's end, at x = epoch (train_network.py epoch_logging): the
        mean loss of the epoch's steps (those of this run, for an epoch a resume entered part-way)."""
        if self.epoch_losses:
            logs = {"loss/epoch_average": sum(self.epoch_losses) / len(self.epoch_losses)}
            self._log(logs, epoch, epoch)
        self.epoch_losses = []

    def validation(self, kind: str, loss: float, step: int, epoch: int) -> None:
        """sd-scripts' validation logs (``kind`` "step" or "epoch"); epoch logs go at x = epoch, as there."""
        train = sum(self.losses[-100:]) / len(self.losses[-100:]) if self.losses else loss
        logs = {f"loss/validation/{kind}_average": loss, f"loss/validation/{kind}_divergence": loss - train}
        self.last_validation = logs
        self._log(logs, epoch if kind == "epoch" else step, epoch)
        if not self.quiet:
            message = f"validation ({kind} {epoch if kind == 'epoch' else step}): loss {loss:.4f}"
            if self._bar is not None:
                self._bar.write(message)
            else:
                print(message, flush=True)

    def samples(self, drawn: list) -> None:
        """Sample images (prompt, PIL image) as sd-scripts' sample_image_inference sends them: to wandb only."""
        for writer in self.writers if drawn else ():
            writer.samples(drawn)

    def _log(self, logs: dict, x: int, epoch: int) -> None:
        """``x``: TensorBoard's x (the global step, or the epoch for per-epoch metrics)."""
        for writer in self.writers:
            writer.log(logs, x, global_step=self.global_step, epoch=epoch)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for writer in self.writers:
            writer.close()
        self.writers = []  # the samples drawn after training are on disk only


def tensorboard_folder(config) -> str:
    """Where the event files go, as sd-scripts' accelerate puts them: logging_dir/<log_prefix><time>/<tracker name>
    (the Accelerator's project_dir, then TensorBoardTracker's run name, log_tracker_name or network_train)."""
    run = (config.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")
    return os.path.join(config.logging_dir, run, config.log_tracker_name or "network_train")


def max_norm_logs(max_norm: tuple[int, float, float] | None) -> dict[str, float]:
    """sd-scripts' scale_weight_norms metrics, with current train_network.py's generate_step_logs names: the
    adapters scaled this step, the largest norm after scaling, and the mean in the norm/ namespace (older releases
    named it max_norm/average_key_norm). None (no scale_weight_norms): none."""
    if max_norm is None:
        return {}
    keys_scaled, mean_norm, maximum_norm = max_norm
    return {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": maximum_norm,
            "norm/avg_key_norm": mean_norm}


def lr_logs(lrs: list[float], groups: list[dict] | None = None) -> dict[str, float]:
    """sd-scripts' lr metrics (train_network.py generate_step_logs with the network's lr descriptions): lr/<group>
    for each parameter group, named as sd-scripts names them (textencoder, unet, "unet plus" for LoRA+'s boosted
    factors); and where a group holds the adapted step d (D-Adaptation, Prodigy), lr/d*lr/<group> = d x lr, the
    step size these optimizers take. Without the groups: lr/group<i>."""
    if groups is None:
        return {f"lr/group{i}": lr for i, lr in enumerate(lrs)}
    logs = {}
    for i, (lr, group) in enumerate(zip(lrs, groups)):
        name = lr_description(group.get("name", f"group{i}"))
        logs[f"lr/{name}"] = lr
        if "d" in group:
            logs[f"lr/d*lr/{name}"] = group["d"] * group["lr"]
    return logs


def lr_description(group_name: str) -> str:
    """sd-scripts' lr description of a lorakit parameter group: text_encoder -> textencoder, unet_plus -> unet plus."""
    return group_name.replace("text_encoder", "textencoder").replace("_plus", " plus")


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="steps", smoothing=0)


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, logs: dict, x: int, *, global_step: int, epoch: int) -> None:
        for key, value in logs.items():
            self.writer.add_scalar(key, value, x)

    def samples(self, drawn: list) -> None:
        pass  # sd-scripts sends samples to wandb only

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run):
        self.run = run
        for axis in ("global_step", "epoch"):  # sd-scripts' init_trackers: x-axes to choose, not charts
            run.define_metric(axis, hidden=True)

    def log(self, logs: dict, x: int, *, global_step: int, epoch: int) -> None:
        # no step=: wandb drops a log at a step below its last one, as an epoch would be after the steps
        self.run.log({**logs, "global_step": global_step, "epoch": epoch})

    def samples(self, drawn: list) -> None:
        import wandb

        # commit=False, as sd-scripts: the images join the next metrics' row instead of taking a step of their own
        self.run.log({f"sample_{i}": wandb.Image(image, caption=prompt) for i, (prompt, image) in enumerate(drawn)},
                     commit=False)

    def close(self) -> None:
        self.run.finish()

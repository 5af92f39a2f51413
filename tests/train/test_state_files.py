"""A state folder read back by load_state, without a training run: a state with no per-setting record (an older
lorakit's) is checked by its digest alone, optimizer groups saved in another order come back on the groups of the
same name (torch's Optimizer.load_state_dict maps groups by position), a resume state in another folder that a
kill while re-saving it left only as a temporary copy is put back, and fp16's loss scale comes back as saved
(accelerate's save_state/load_state keep the GradScaler's, which sd-scripts' resume relies on)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from lorakit.train.loss_scale import LossScaler
from lorakit.train.state import Progress, StateError, load_state, restore_states, save_state, saved_seed


class _TwoAdapters(torch.nn.Module):
    """Two adapters of the same shape, so that a state put on the wrong one still loads without an error."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Parameter(torch.zeros(3))
        self.te = torch.nn.Parameter(torch.zeros(3))


def _optimizer(net, order):
    lrs = {"unet": 1e-3, "text_encoder": 1e-4}
    params = {"unet": net.unet, "text_encoder": net.te}
    groups = [{"params": [params[name]], "lr": lrs[name], "name": name} for name in order]
    optimizer = torch.optim.AdamW(groups)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)


def _trained_state(folder, progress):
    """One AdamW step with a different gradient on each adapter, saved with the U-Net's group first."""
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["unet", "text_encoder"])
    net.unet.grad, net.te.grad = torch.full((3,), 1.0), torch.full((3,), -5.0)
    optimizer.step()
    scheduler.step()
    save_state(folder, net.state_dict(), optimizer, scheduler, progress)
    return net


def test_a_state_without_recorded_settings_and_another_digest_is_refused(tmp_path):
    """A state that records only the digest of its settings (no 'settings'): a different digest is all there is to
    tell the settings changed, so the resume is refused; the same digest resumes."""
    _trained_state(tmp_path / "s", Progress(global_step=1, step_in_epoch=1, config_digest="a" * 16))
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["unet", "text_encoder"])
    with pytest.raises(StateError, match="different training settings"):
        load_state(tmp_path / "s", net, optimizer, scheduler, "b" * 16, settings={"learning_rate": "0.001"})
    progress = load_state(tmp_path / "s", net, optimizer, scheduler, "a" * 16, settings={"learning_rate": "0.001"})
    assert progress.global_step == 1


def test_optimizer_groups_saved_in_another_order_come_back_by_name(tmp_path):
    """Saved as (unet, text_encoder), resumed by a run whose groups are (text_encoder, unet): each adapter gets
    its own moments and learning rate back, as if the order had not changed."""
    saved_net = _trained_state(tmp_path / "s", Progress(global_step=1, step_in_epoch=1))
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["text_encoder", "unet"])
    load_state(tmp_path / "s", net, optimizer, scheduler, "")
    assert torch.equal(net.unet, saved_net.unet) and torch.equal(net.te, saved_net.te)
    # AdamW's first step: exp_avg = (1 - beta1) * grad = 0.1 * grad, per adapter
    assert torch.allclose(optimizer.state[net.unet]["exp_avg"], torch.full((3,), 0.1))
    assert torch.allclose(optimizer.state[net.te]["exp_avg"], torch.full((3,), -0.5))
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("text_encoder", 1e-4), ("unet", 1e-3)]
    assert scheduler.base_lrs == [1e-4, 1e-3] and scheduler.last_epoch == 1


def test_the_fp16_loss_scale_comes_back_as_saved(tmp_path):
    """A skipped step (an inf gradient) halves GradScaler's scale, 65536 -> 32768, and a good step counts towards
    the next growth: a resume goes on from that scale and count, not from a fresh scaler's."""
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["unet", "text_encoder"])
    scaler = LossScaler("cpu", enabled=True)
    scaler.scale(torch.tensor(1.0))
    for unet_grad in (float("inf"), 1.0):
        net.unet.grad, net.te.grad = torch.full((3,), unet_grad), torch.full((3,), 1.0)
        scaler.step_and_update(optimizer)
    saved = scaler.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (32768.0, 1)
    save_state(tmp_path / "s", net.state_dict(), optimizer, scheduler, Progress(global_step=2), scaler=scaler)
    net = _TwoAdapters()
    resumed = LossScaler("cpu", enabled=True)
    load_state(tmp_path / "s", net, *_optimizer(net, ["unet", "text_encoder"]), "", scaler=resumed)
    assert resumed.state_dict() == saved


def test_a_resume_state_outside_the_output_folder_left_as_a_temporary_is_put_back(tmp_path):
    """resume= names a state of another run's folder, which a kill between staging_folder's two renames left only as
    .t-state.{pid}.{hex}.tmp (its writer gone): the run's start puts it back under its name, as it does for the
    states of its own output folder, and the resume reads it."""
    _trained_state(tmp_path / "first" / "t-state", Progress(global_step=1, step_in_epoch=1))
    writer = subprocess.Popen(["true"])
    writer.wait()  # a process id that is no longer running: the kill
    copy = tmp_path / "first" / f".t-state.{writer.pid}.4567abcd.tmp"
    (tmp_path / "first" / "t-state").rename(copy)
    resume = tmp_path / "first" / "t-state"
    assert restore_states(tmp_path / "second", resume) == [(resume, copy)]
    net = _TwoAdapters()
    assert load_state(resume, net, *_optimizer(net, ["unet", "text_encoder"]), "").global_step == 1


def _truncate(name, size):
    def change(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:size])
    return change


@pytest.mark.parametrize("change, message", [
    (_truncate("optimizer.pt", 0), r"optimizer.pt cannot be read \(the file is empty: 0 bytes\)"),
    (_truncate("optimizer.pt", 1), r"optimizer.pt cannot be read \(damaged, or not the file a state save writes\)"),
    (lambda folder: (folder / "optimizer.pt").write_text("hello\n"), r"optimizer.pt cannot be read \(damaged"),
    (_truncate("optimizer.pt", 300), r"optimizer.pt cannot be read \(PytorchStreamReader failed"),
    (_truncate("network.safetensors", 0), r"network.safetensors cannot be read \(the file is empty: 0 bytes\)"),
    (_truncate("network.safetensors", 20), r"network.safetensors cannot be read \(not a safetensors file, or "
                                           "truncated"),
], ids=["empty_optimizer", "one_byte_optimizer", "text_optimizer", "truncated_optimizer", "empty_network",
        "truncated_network"])
def test_an_empty_or_damaged_state_file_is_refused_naming_it(tmp_path, change, message):
    """What a copy to a full disk or an interrupted sync leaves: torch.load raises a bare EOFError for an empty file
    and a KeyError or UnpicklingError for other bytes; each is refused with the folder, the file and what is wrong."""
    folder = tmp_path / "s"
    _trained_state(folder, Progress(global_step=1, step_in_epoch=1))
    change(folder)
    net = _TwoAdapters()
    with pytest.raises(StateError, match=f"^resume={folder}: {message}"):
        load_state(folder, net, *_optimizer(net, ["unet", "text_encoder"]), "")


# (epoch, step_in_epoch, global_step) at 5 batches per epoch and gradient_accumulation_steps 2: 3 steps per epoch
@pytest.mark.parametrize("position, fits", [
    ((1, 0, 0), True), ((1, 2, 1), True), ((1, 5, 3), True), ((2, 0, 3), True), ((3, 4, 8), True),
    ((2, 0, 4), True), ((2, 2, 5), True),  # initial_step 4 without skip_until_initial_step: epoch 2 from its start
    ((2, 0, 2), False), ((2, 0, 6), False), ((9, 0, 3), False), ((0, 0, 0), False), ((1, 6, 3), False),
])
def test_a_saved_position_is_checked_against_the_epochs_and_the_step_count(tmp_path, position, fits):
    """Positions a run reaches resume; an epoch or batch a run cannot have reached at that step count is refused
    naming the state, the file and the keys (the loop would fail without naming the state, or train nothing)."""
    epoch, batch, step = position
    _trained_state(tmp_path / "s", Progress(epoch=epoch, step_in_epoch=batch, global_step=step))
    net = _TwoAdapters()
    load = lambda: load_state(tmp_path / "s", net, *_optimizer(net, ["unet", "text_encoder"]), "",  # noqa: E731
                              epoch_size=(5, 2))
    if fits:
        assert load().global_step == step
    else:
        with pytest.raises(StateError, match=rf"^resume={tmp_path / 's'}: train_state.json: (epoch|step_in_epoch) ="):
            load()


def test_a_saved_epoch_0_is_refused_saying_epochs_count_from_1(tmp_path):
    """train_state.json counts epochs from 1, as sd-scripts names them: epoch 0 is refused as such, not as a
    position that does not fit the step count (which would name a step -3 no run reaches)."""
    _trained_state(tmp_path / "s", Progress(epoch=0, step_in_epoch=0, global_step=0))
    net = _TwoAdapters()
    with pytest.raises(StateError, match=r"train_state.json: epoch = 0 \(epochs count from 1\)$"):
        load_state(tmp_path / "s", net, *_optimizer(net, ["unet", "text_encoder"]), "", epoch_size=(5, 2))


def test_a_seed_that_is_not_a_whole_number_is_refused_naming_the_key(tmp_path):
    _trained_state(tmp_path / "s", Progress(global_step=1, step_in_epoch=1, seed=7))
    assert saved_seed(tmp_path / "s") == 7
    path = tmp_path / "s" / "train_state.json"
    path.write_text(path.read_text().replace('"seed": 7', '"seed": 7.5'))
    with pytest.raises(StateError, match=r"train_state.json: seed = 7.5 \(expected a whole number, or null\)"):
        saved_seed(tmp_path / "s")


@pytest.mark.parametrize("options, hint", [
    ({}, "no state was saved to resume from (save_state = true keeps one at every save)"),
    ({"save_state": True, "save_every_n_steps": 4},
     "no state was saved yet: the run stopped before its first save (save_every_n_steps = 4)"),
    ({"save_state": True, "save_every_n_epochs": 2},
     "no state was saved yet: the run stopped before its first save (save_every_n_epochs = 2)"),
    ({"save_state": True}, "no state was saved yet: without save_every_n_steps or save_every_n_epochs, save_state "
                           "keeps one at the end of training only"),
    ({"save_state_on_train_end": True}, "no state was saved yet: save_state_on_train_end keeps one at the end of "
                                        "training only (save_state = true keeps one at every save)"),
], ids=["no_state_option", "steps", "epochs", "end_only", "train_end"])
def test_the_ctrl_c_hint_without_a_state_fits_the_saving_options(options, hint):
    """Ctrl-C before the first save: the hint names save_state only to a run that does not set it; one that sets it
    hears why nothing was saved yet."""
    from types import SimpleNamespace

    from lorakit.train.state import no_state_yet

    config = SimpleNamespace(**{name: None for name in ("save_every_n_steps", "save_every_n_epochs",
                                                        "save_n_epoch_ratio")},
                             save_state=False, save_state_on_train_end=False)
    assert no_state_yet(SimpleNamespace(**{**vars(config), **options})) == hint


def test_a_state_recording_lorakit_kohya_resumes_as_lorakit():
    """An older lorakit recorded network_module 'lorakit.kohya', which now reads as 'lorakit': no change."""
    from lorakit.train.state import _changed

    assert _changed({"network_module": "'lorakit.kohya'"}, {"network_module": "'lorakit'"}) == ""
    assert _changed({"network_module": "'networks.lora'"}, {"network_module": "'lorakit'"}) != ""


_KILLED_WHILE_SAVING = """
import io, os, sys
import torch
from lorakit.train.state import Progress, save_state

real_save = torch.save

def killed(obj, path, *args, **kwargs):  # SIGKILL part-way through optimizer.pt: half its bytes are on disk
    buffer = io.BytesIO()
    real_save(obj, buffer)
    with open(path, "wb") as file:
        file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    os._exit(9)

torch.save = killed
weight = torch.nn.Parameter(torch.zeros(3))
optimizer = torch.optim.AdamW([weight])
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
save_state(sys.argv[1], {"w": weight.detach()}, optimizer, scheduler, Progress(global_step=1, step_in_epoch=1))
"""


def test_a_kill_while_a_state_is_written_leaves_no_copy_that_passes_for_complete(tmp_path):
    """save_state writes train_state.json last, so the temporary copy a kill leaves part-way through optimizer.pt
    (the new state, never renamed into place) lacks it: the next run's start does not put that copy back as the
    state (restore_states takes only complete copies), and a resume names the state missing instead of failing on
    a truncated optimizer.pt, or reading it."""
    import sys

    target = tmp_path / "t-step00000001-state"
    done = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, str(target)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    copies = [p for p in tmp_path.iterdir() if p.name.startswith(".t-step00000001-state.") and p.name.endswith(".tmp")]
    assert len(copies) == 1 and (copies[0] / "optimizer.pt").is_file()  # the kill's leftover, half-written
    assert restore_states(tmp_path) == [] and not target.exists()


def test_a_state_of_an_older_version_passes_on_this_versions_settings_to_the_next_state(tmp_path):
    """A state whose run recorded fewer settings (an option a later lorakit added) resumes when the settings both
    record agree; the resumed run's own states then record all of this run's settings and their digest, so that a
    second resume that changes the added option is refused (were the old record passed on, that option would never
    be compared again)."""
    old = {"learning_rate": "0.001"}
    _trained_state(tmp_path / "s", Progress(global_step=1, step_in_epoch=1, config_digest="a" * 16, settings=old))
    now = {"learning_rate": "0.001", "min_snr_gamma": "5.0"}
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["unet", "text_encoder"])
    progress = load_state(tmp_path / "s", net, optimizer, scheduler, "b" * 16, settings=now)
    assert (progress.config_digest, progress.settings) == ("b" * 16, now)
    save_state(tmp_path / "later", net.state_dict(), optimizer, scheduler, progress)
    net = _TwoAdapters()
    with pytest.raises(StateError, match=r"different training settings \(min_snr_gamma: 5.0 -> 1.0\)"):
        load_state(tmp_path / "later", net, *_optimizer(net, ["unet", "text_encoder"]), "c" * 16,
                   settings={"learning_rate": "0.001", "min_snr_gamma": "1.0"})


def test_a_state_saved_with_or_without_deepspeed_is_refused_by_the_other_kind_of_run(tmp_path):
    """A DeepSpeed state keeps its optimizer in the engine's deepspeed/ folder, a plain one in optimizer.pt: a
    resume by the other kind of run is refused with the option to set, before anything loads (not an engine error
    about a missing checkpoint, or a missing optimizer state)."""
    _trained_state(tmp_path / "plain", Progress(global_step=1, step_in_epoch=1))
    net = _TwoAdapters()
    optimizer, scheduler = _optimizer(net, ["unet", "text_encoder"])
    with pytest.raises(StateError, match=r"plain: the state was saved without deepspeed; resume it with "
                                         r"deepspeed = false"):
        load_state(tmp_path / "plain", net, None, scheduler, "")
    save_state(tmp_path / "ds", net.state_dict(), None, scheduler, Progress(global_step=1, step_in_epoch=1),
               deepspeed=(2, lambda folder: folder.mkdir()))
    with pytest.raises(StateError, match=r"ds: the state was saved with deepspeed; resume it with deepspeed = true"):
        load_state(tmp_path / "ds", net, optimizer, scheduler, "")

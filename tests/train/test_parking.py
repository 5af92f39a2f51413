"""Where the models are: they load on the CPU and each joins the accelerator when used (the VAE while latents are
cached, the text encoders while their outputs are, the rest for training); the cached ones stay off it and come
back only for the samples. A CPU run moves nothing, so the test parks them as unusable tensors instead: any use
outside a borrow fails, and the run must give the adapter of one that never parks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from safetensors.torch import load_file as read_tensors  # noqa: E402
from lorakit.train import parking as parking_module  # noqa: E402
from lorakit.train import run as run_module  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402


class _Parked(torch.Tensor):
    """A parked model's tensor: what it is can be read (dtype, shape), any computation with it fails."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "__get__":
            return super().__torch_function__(func, types, args, kwargs or {})
        raise AssertionError(f"a parked model's tensor was used ({getattr(func, '__name__', func)})")


class _StrictParking(parking_module.Parking):
    """Parking that acts as on an accelerator, and makes a parked model unusable until it is borrowed or brought.
    It logs where each model goes, and which models are on the device while each cache is filled."""

    log: list[str] = []
    live: "_StrictParking | None" = None

    def __init__(self, device):
        super().__init__(device)
        self.away: set[int] = set()  # the models off the device (as their ids), borrowed ones not among them
        type(self).live = self

    @property
    def frees_memory(self) -> bool:
        return True

    def on_device(self) -> list[str]:
        model = self.model
        return [type(m).__name__ for _, m in model.components() if id(m) not in self.away]

    def wait(self, *modules):
        super().wait(*modules)
        self.away.update(id(m) for m in modules)
        self.log.extend(f"wait {type(m).__name__}" for m in modules)

    def _move(self, module, onto_device):  # the device is the CPU both ways here: tensors are poisoned instead
        stores = [store for m in module.modules() for store in (m._parameters, m._buffers)]
        if onto_device:
            for store in stores:
                for name in list(store):
                    if (id(store), name) in (getattr(module, "_stash", None) or {}):
                        store[name] = module._stash[(id(store), name)]
            module._stash = None
            self.away.discard(id(module))
            self.log.append(f"on {type(module).__name__}")
        else:
            module._stash = {(id(store), name): t for store in stores for name, t in store.items() if t is not None}
            for store in stores:
                for name, t in store.items():
                    if t is not None:
                        store[name] = torch.Tensor._make_subclass(_Parked, t.detach())
            self.away.add(id(module))
            self.log.append(f"off {type(module).__name__}")


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("parking")
    save_checkpoint(random_model(request.param, seed=0), root / "sd.safetensors", dtype=None)
    encoders = ["CLIPTextModel"] + (["CLIPTextModelWithProjection"] if request.param == "tiny-sdxl" else [])
    write_concept_folder(root / "data", n=4, repeats=1)
    (root / "prompts.txt").write_text("a red circle --w 64 --h 64 --s 2 --d 5\n")
    return SimpleNamespace(root=root, encoders=encoders)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: with two, the CPU convolutions' sums vary in the last bits from run to run, and Adam
    turns that into visible differences in the factors whose gradients are near zero (a plain run and a parked
    one differed by 1e-4 in lora_down). With one they are the same bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(base, out, **extra):
    base = base.root
    values = dict(pretrained_model_name_or_path=str(base / "sd.safetensors"), resolution="64", output_dir=str(out),
                  output_name="t", network_dim=4, network_alpha=2, learning_rate=1e-2, max_train_steps=3,
                  train_batch_size=2, seed=3, max_data_loader_n_workers=0, caption_extension=".txt",
                  train_data_dir=str(base / "data"), network_train_unet_only=True, cache_latents=True,
                  cache_text_encoder_outputs=True, sample_prompts=str(base / "prompts.txt"), sample_at_first=True,
                  sample_every_n_steps=2, validation_split=0.25, validate_every_n_steps=1)
    values.update(extra)
    return train(load_train_config(overrides=values))


def _watch(monkeypatch):
    """The strict parking in the run, and a log line with the models on the device as each cache fills."""
    import lorakit.data
    import lorakit.data.text_cache

    monkeypatch.setattr(run_module, "Parking", _StrictParking)
    _StrictParking.log = []
    original_load = run_module._Run._load_model

    def load(run, parking):
        model = original_load(run, parking)
        parking.model = model
        return model

    monkeypatch.setattr(run_module._Run, "_load_model", load)
    for owner, name in ((lorakit.data, "cache_latents"), (lorakit.data.text_cache, "cache_text_outputs")):
        def filled(*args, _fill=getattr(owner, name), _name=name, **kwargs):
            _StrictParking.log.append(f"{_name} with {_StrictParking.live.on_device()}")
            return _fill(*args, **kwargs)

        monkeypatch.setattr(owner, name, filled)


def test_each_model_joins_the_device_when_used_and_cached_ones_come_back_for_samples(base, tmp_path, monkeypatch):
    plain = read_tensors(_train(base, tmp_path / "plain"))
    _watch(monkeypatch)
    parked = read_tensors(_train(base, tmp_path / "parked"))
    assert parked.keys() == plain.keys()
    for key in plain:
        assert torch.equal(parked[key], plain[key]), key
    unet, vae, encoders = "UNet2DConditionModel", "AutoencoderKL", base.encoders
    # latents for the training and the validation images, then each caption's outputs for both: only the model
    # that is encoding is on the device, as in sd-scripts; then the U-Net joins it for training
    caching = ([f"wait {name}" for name in (unet, vae, *encoders)] + [f"on {vae}"] + [f"cache_latents with {[vae]}"] * 2
               + [f"off {vae}"] + [f"on {name}" for name in encoders] + [f"cache_text_outputs with {encoders}"] * 2
               + [f"off {name}" for name in encoders] + [f"on {unet}"])
    draw = [f"on {name}" for name in (vae, *encoders)] + [f"off {name}" for name in (vae, *encoders)]
    assert _StrictParking.log == caching + draw * 3  # samples at first, at step 2 and at the end
    assert len(list((tmp_path / "parked" / "sample").glob("*.png"))) == 3


def test_with_lowram_every_model_loads_on_the_device_and_the_cached_ones_leave_it(base, tmp_path, monkeypatch):
    _watch(monkeypatch)
    _train(base, tmp_path / "out", lowram=True, sample_prompts=None, max_train_steps=1)
    vae, encoders = "AutoencoderKL", base.encoders
    on_device = ["UNet2DConditionModel", vae, *encoders]
    assert _StrictParking.log == ([f"cache_latents with {on_device}"] * 2 + [f"cache_text_outputs with {on_device}"] * 2
                                  + [f"off {name}" for name in (vae, *encoders)])


def test_models_join_the_device_for_training_when_nothing_is_cached(base, tmp_path, monkeypatch):
    _watch(monkeypatch)
    _train(base, tmp_path / "out", cache_latents=False, cache_text_encoder_outputs=False, sample_prompts=None,
           validation_split=0.0, max_train_steps=1)
    names = ["UNet2DConditionModel", "AutoencoderKL", *base.encoders]
    assert _StrictParking.log == [f"wait {name}" for name in names] + [f"on {name}" for name in names]


def test_the_cpu_parks_nothing():
    module = torch.nn.Linear(2, 2)
    parking = parking_module.Parking(torch.device("cpu"))
    parking.park(module)
    assert parking.parked == [] and module.weight.device.type == "cpu"


def test_a_brought_model_stays_on_the_device_through_a_borrow():
    """bring puts a model on the device for good: a draw's borrow of it afterwards (the text encoders a run trains,
    which samples borrow with the parked VAE) moves nothing, and only the parked model goes back after the draw
    (the trained one leaving the device would fail the next training step)."""
    moves = []

    class Recording(parking_module.Parking):
        frees_memory = property(lambda self: True)

        def _move(self, module, onto_device):
            moves.append((module, onto_device))

    text_encoder, vae = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    parking = Recording(torch.device("cpu"))
    parking.wait(text_encoder, vae)
    parking.bring(text_encoder)
    assert moves == [(text_encoder, True)] and parking.parked == [vae]
    with parking.borrowed(vae, text_encoder):
        assert moves[1:] == [(vae, True)]
    assert moves[1:] == [(vae, True), (vae, False)] and parking.parked == [vae]

"""The memory estimate against the instrument, the levers, and the planner's picks."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from train_helpers import REPO, make_images, one_torch_thread, tiny_config

sys.path.insert(0, str(REPO / "bench"))
from harness.memtrack import measure_training_peak  # noqa: E402

from trainers.adapters import add_unet_lora, lora_parameters  # noqa: E402
from trainers.config import LoraConfig  # noqa: E402
from trainers.memory import (GIB, LEVERS, ModelShape, Setup, activation_key, estimate_bytes, fit_activation_entry,  # noqa: E402
                             fit_point, known_shape, plan_levers, slowdown, with_margin)
from trainers.models.loading import load_base_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def _tiny_base(cfg, device: str = "meta"):
    """The tiny model: its weights on the CPU, or its shapes only on the meta device, where the instrument counts
    device memory apart from the CPU memory that parked encoders move to."""
    if device == "cpu":
        return load_base_model(cfg.model, dtype=torch.float32)
    from tiny_models import _TINY_TEXT, _TINY_UNETS, _TINY_VAE, random_model

    with torch.device("meta"):
        return random_model("sd1", unet=_TINY_UNETS["sd1"], text=_TINY_TEXT, vae=_TINY_VAE)


def _levers_cfg(cfg, levers: set[str], batch: int, resolution: int):
    train = dataclasses.replace(cfg.train, batch_size=batch, mixed_precision="no", optimizer="adamw",
                                gradient_checkpointing="gradient_checkpointing" in levers,
                                offload_encoders="on" if "offload_encoders" in levers else "off",
                                fp8_base="on" if "fp8_base" in levers else "off")
    return dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, resolution=resolution))


def _measure(cfg, levers=frozenset(), batch=1, resolution=64, device="meta"):
    cfg = _levers_cfg(cfg, set(levers), batch, resolution)
    return measure_training_peak(cfg, _tiny_base(cfg, device), device=device)


def _peak(cfg, levers=frozenset(), batch=1, resolution=64, device="meta") -> int:
    return _measure(cfg, levers, batch, resolution, device).peak_bytes


def _tiny_shape(cfg) -> ModelShape:
    """The tiny model's parameters counted, its activations fitted by the instrument at batch 1 and 4 (64 px)."""
    base = _tiny_base(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    add_unet_lora(base.unet, LoraConfig(rank=1, alpha=1))
    lora = sum(p.numel() for p in lora_parameters(base.unet))
    shape = ModelShape("tiny", count(base.unet) - lora, sum(count(t) for t in base.text_encoders), count(base.vae),
                       {"attention": lora}, {})
    activations = {}
    for levers in (set(), {"gradient_checkpointing"}, {"fp8_base"}, {"fp8_base", "gradient_checkpointing"}):
        points = [fit_point(shape, _setup(cfg, batch, 64), levers, *_phases(_measure(cfg, levers, batch)))
                  for batch in (1, 4)]
        activations[activation_key(False, levers)] = fit_activation_entry(points, weight_bytes=4)  # trains in fp32
    return dataclasses.replace(shape, activations=activations)


def _phases(measured) -> tuple[int, int]:
    return measured.forward_bytes, measured.backward_bytes


def _setup(cfg, batch, resolution) -> Setup:
    return Setup("lora", batch, resolution, 4, cfg.lora.rank, cfg.lora.targets)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    cfg = tiny_config(tmp, make_images(tmp / "images"))
    return cfg, _tiny_shape(cfg)


@pytest.mark.parametrize("levers,batch,resolution", [
    ((), 3, 64), ((), 2, 96), (("gradient_checkpointing",), 3, 64), (("offload_encoders",), 2, 64),
    (("fp8_base",), 2, 64), (("fp8_base", "offload_encoders"), 3, 96),
    (("fp8_base", "offload_encoders", "gradient_checkpointing"), 3, 64)])
def test_estimate_is_within_ten_percent_of_the_instrument(tiny, levers, batch, resolution):
    cfg, shape = tiny
    measured = _peak(cfg, set(levers), batch, resolution)
    estimate = estimate_bytes(shape, _setup(cfg, batch, resolution), set(levers))["total"]
    assert abs(estimate / measured - 1) <= 0.10, (estimate, measured)


@pytest.mark.parametrize("lever", ["offload_encoders", "fp8_base", "gradient_checkpointing"])
def test_each_lever_lowers_the_instrument_peak(tiny, lever):
    cfg, _ = tiny
    assert _peak(cfg, {lever}, batch=2) < _peak(cfg, set(), batch=2)


def test_fp8_weights_and_checkpointing_lower_the_peak_of_a_real_cpu_step(tiny):
    """On the CPU the parked encoders stay in the same memory: only the others show in a real step."""
    cfg, _ = tiny
    plain = _peak(cfg, set(), batch=2, device="cpu")
    for lever in ("fp8_base", "gradient_checkpointing"):
        assert _peak(cfg, {lever}, batch=2, device="cpu") < plain, lever


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("budget_gb", [4, 6, 8, 12, 16, 24, 80])
def test_auto_picks_the_fastest_combination_that_fits(model, budget_gb):
    shape, setup = known_shape(model), Setup("lora", 1, 512 if model == "sd15" else 1024, 2)
    budget = budget_gb * GIB
    try:
        plan = plan_levers(shape, setup, mode="auto", forced_on=set(), forced_off=set(),
                           available={"adamw8bit"}, budget=budget, budget_source="test")
    except Exception as exc:  # nothing fits: then no combination may fit
        assert all(with_margin(e) > budget for _, e, _ in _all(shape, setup)), exc
        return
    assert with_margin(plan.estimate_bytes) <= budget
    faster = [c for c, e, s in _all(shape, setup) if s < slowdown(plan.levers) and with_margin(e) <= budget]
    assert not faster


def _all(shape, setup):
    import itertools

    names = [n for n in LEVERS if n != "fused_backward"]
    for n in range(len(names) + 1):
        for combo in itertools.combinations(names, n):
            yield combo, estimate_bytes(shape, setup, set(combo))["total"], slowdown(combo)


def test_fused_backward_steps_during_backward_and_frees_each_gradient():
    from trainers.levers import FusedBackwardOptimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    joint = torch.optim.AdamW(models[0].parameters(), lr=0.1)
    fused = FusedBackwardOptimizer([{"params": list(models[1].parameters()), "lr": 0.1}],
                                   lambda groups: torch.optim.AdamW(groups))
    x = torch.randn(3, 4)
    for _ in range(2):
        models[0](x).square().sum().backward()
        joint.step()
        joint.zero_grad()
        models[1](x).square().sum().backward()
        assert all(p.grad is None for p in models[1].parameters())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_fused_backward_trains_the_same_weights_as_the_joint_step(tmp_path):
    """Per-parameter AdamW steps during backward are the joint AdamW step (no clipping, no accumulation)."""
    from trainers.loop import train

    images = make_images(tmp_path / "images")
    weights = {}
    for fused in ("off", "on"):
        cfg = tiny_config(tmp_path / fused, images, steps=3, train={"method": "full", "max_grad_norm": 0.0,
                                                                    "fused_backward": fused, "learning_rate": 1e-4},
                          full={"ema": False})
        result = train(cfg)
        from safetensors.torch import load_file
        weights[fused] = load_file(next(result.run_dir.glob("checkpoints/step_*/trainable.safetensors")))
    assert weights["on"].keys() == weights["off"].keys()
    for key, value in weights["off"].items():
        torch.testing.assert_close(weights["on"][key], value, rtol=1e-5, atol=1e-6)


def test_the_plan_decides_every_auto_lever_and_a_budget_too_small_fails_before_weights_load(tmp_path, monkeypatch):
    from tiny_models import tiny_single_file

    import trainers.loop as loop
    from trainers.errors import ConfigError
    from trainers.plan import make_plan

    monkeypatch.setattr(loop, "load_base_model", lambda *a, **k: pytest.fail("weights were loaded"))
    images = make_images(tmp_path / "images")
    base = {"base": str(tiny_single_file())}
    plan = make_plan(tiny_config(tmp_path, images, model=base, train={"memory": "lowest"}))
    assert plan.memory.estimate_bytes == min(estimate for _, estimate, _ in plan.memory.candidates)
    assert len(plan.memory.candidates) == 2 ** 3  # checkpointing, parked encoders, fp8 (no 8-bit Adam on a CPU)
    t = plan.cfg.train
    assert {t.offload_encoders, t.fp8_base} <= {"on", "off"} and t.optimizer == "adamw"
    assert plan.summary()["memory_plan"]["text"].startswith("memory (lowest)")
    kept = make_plan(tiny_config(tmp_path, images, model=base, train={"memory": "lowest", "fp8_base": "off"}))
    assert kept.cfg.train.fp8_base == "off"  # an explicit setting wins
    with pytest.raises(ConfigError, match="needs about .* GiB even with every memory lever"):
        loop.train(tiny_config(tmp_path, images, model=base, train={"memory_budget_gb": 0.001}))


def _sdxl_lora(tmp_path, **train):
    from trainers.config import Config

    return Config.from_dict({"model": {"base": "random-sdxl"}, "data": {"folder": str(tmp_path), "resolution": 1024},
                             "train": {"method": "lora", "mixed_precision": "bf16", **train}})


@pytest.mark.parametrize("available,budget_gb,optimizer", [
    ({"adamw8bit"}, 80, "adamw"),  # fits without: no 8-bit rounding of the state
    ({"adamw8bit"}, 4.05, "adamw8bit"),  # fits only with every lever, the smaller state too
    (set(), 80, "adamw"),  # no CUDA or no bitsandbytes: never picked
])
def test_auto_optimizer_is_8bit_only_where_the_plan_needs_it(tmp_path, available, budget_gb, optimizer):
    from trainers.memory import plan_for_config

    cfg, plan = plan_for_config(_sdxl_lora(tmp_path, memory_budget_gb=budget_gb), known_shape("sdxl"),
                                available=available)
    assert cfg.train.optimizer == optimizer
    assert ("adamw8bit" in plan.levers) == (optimizer == "adamw8bit")


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy", "adamw8bit"])
def test_an_optimizer_the_user_names_is_kept_by_the_plan(tmp_path, optimizer):
    from trainers.memory import plan_for_config

    cfg, plan = plan_for_config(_sdxl_lora(tmp_path, optimizer=optimizer, memory_budget_gb=5), known_shape("sdxl"),
                                available={"adamw8bit"})
    assert cfg.train.optimizer == optimizer
    assert ("adamw8bit" in plan.levers) == (optimizer == "adamw8bit")

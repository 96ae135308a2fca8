"""Resuming continues a run exactly: every process's noise and dropout draws, the fp16 loss scale, EMA weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from safetensors.torch import load_file

from trainers.checkpointing import LoopState, Resumables, latest_checkpoint, load_checkpoint, save_checkpoint
from trainers.loop import train

from train_helpers import TWO_CPU_PROCESSES, read_events, run_python, stop_then_resume, tiny_config

TOLERANCE = 1e-5


def progress_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "progress"]


def curve_differences(want: list[float], got: list[float]) -> list[str]:
    if len(got) != len(want):
        return [f"{len(got)} steps instead of {len(want)}"]
    return [f"step {step}: {a} uninterrupted vs {b} resumed"
            for step, (a, b) in enumerate(zip(want, got), start=1) if abs(a - b) > TOLERANCE]


def assert_same_curve(want: list[float], got: list[float]) -> None:
    differences = curve_differences(want, got)
    assert not differences, "; ".join(differences)


def test_a_resumed_lora_with_dropout_draws_the_same_dropout_masks(tmp_path, images):
    # Dropout masks come from the global torch RNG: a resume must restore it, not reseed it.
    settings = {"lora": {"dropout": 0.1}, "train": {"learning_rate": 1e-2}}
    straight = train(tiny_config(tmp_path / "a", images, steps=6, **settings))
    _, resumed = stop_then_resume(tiny_config(tmp_path / "b", images, steps=6, **settings), at_step=3)
    assert_same_curve(progress_losses(straight.run_dir), progress_losses(resumed.run_dir))


def test_a_resumed_full_finetune_continues_its_ema(tmp_path, images):
    settings = {"train": {"method": "full", "learning_rate": 1e-4}, "full": {"ema": True, "ema_decay": 0.9}}
    straight = train(tiny_config(tmp_path / "a", images, steps=4, **settings))
    _, resumed = stop_then_resume(tiny_config(tmp_path / "b", images, steps=4, **settings), at_step=2)
    assert_same_curve(progress_losses(straight.run_dir), progress_losses(resumed.run_dir))
    want = load_file(str(latest_checkpoint(straight.run_dir) / "extra.safetensors"))
    got = load_file(str(latest_checkpoint(resumed.run_dir) / "extra.safetensors"))
    assert want.keys() == got.keys() and "ema.optimization_step" in want
    assert int(got["ema.optimization_step"]) == 4
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_the_fp16_loss_scale_round_trips_through_a_checkpoint(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=5)
    for factor in (float("inf"), 1.0, 1.0):  # an overflow halves the scale; two good steps count towards growth
        scaler.scale((param * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0 ** 15 and saved["_growth_tracker"] == 2
    method = SimpleNamespace(trainable_state=lambda: {"param": param.detach()}, extra_state=dict)
    generator = torch.Generator().manual_seed(0)
    path = save_checkpoint(tmp_path, LoopState(step=3), method, Resumables(optimizer, scheduler, generator, scaler),
                           PartialState(), keep=1)

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=5)
    load_checkpoint(path, Resumables(optimizer, scheduler, torch.Generator(), fresh))
    assert fresh.state_dict() == saved


def test_two_processes_resume_with_each_process_drawing_its_own_noise(tmp_path, images):
    """Each process has its own noise generator and dropout RNG: all of them must come back on resume."""
    configs = {}
    for name in ("straight", "resumed"):
        cfg = tiny_config(tmp_path / name, images, steps=6, train={"batch_size": 1, "learning_rate": 1e-2},
                          lora={"dropout": 0.1})
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(cfg.to_json())
    out = tmp_path / "losses"
    out.mkdir()
    script = str(Path(__file__).with_name("rank_losses.py"))
    launcher = TWO_CPU_PROCESSES + [script, str(out)]
    for jobs in ([f"straight:{configs['straight']}", f"stopped:{configs['resumed']}:stop=3"],
                 [f"resumed:{configs['resumed']}:resume"]):
        result = run_python(launcher + jobs, tmp_path, extra_env={"ACCELERATE_USE_CPU": "1"})
        assert result.returncode == 0, result.stderr[-3000:]

    def losses(name: str, rank: int) -> dict:
        return json.loads((out / f"{name}_{rank}.json").read_text())

    differences = []
    for rank in (0, 1):
        straight, stopped, resumed = (losses(name, rank) for name in ("straight", "stopped", "resumed"))
        assert straight["world"] == stopped["world"] == resumed["world"] == 2, "accelerate ran a single process"
        assert (stopped["status"], resumed["status"]) == ("stopped", "succeeded")
        differences += [f"process {rank}, {d}" for d in curve_differences(
            straight["losses"], stopped["losses"] + resumed["losses"])]
    assert not differences, "; ".join(differences)
    assert losses("straight", 0)["losses"] != losses("straight", 1)["losses"], "both processes drew the same batches"


def test_a_checkpoint_from_before_per_process_rng_files_still_resumes_its_noise(tmp_path):
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    resumables = Resumables(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                            torch.Generator().manual_seed(4))
    method = SimpleNamespace(trainable_state=lambda: {"param": param.detach()}, extra_state=dict)
    path = save_checkpoint(tmp_path, LoopState(step=1), method, resumables, PartialState(), keep=1)
    (path / "rng_0.pt").unlink()
    torch.save({"generator": torch.Generator().manual_seed(11).get_state()}, path / "rng.pt")  # the older layout
    generator = torch.Generator().manual_seed(0)
    load_checkpoint(path, Resumables(optimizer, resumables.lr_scheduler, generator))
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(11)))

"""ComfyUI loads our kohya LoRA and DoRA files, and our LyCORIS LoHa and LoKr files: every key is used, and its
patched UNet and CLIP compute what diffusers computes with the same adapter active.

ComfyUI runs in this process through its own loaders (`comfy.sd.load_checkpoint_guess_config`,
`comfy.sd.load_lora_for_models`), on the CPU and in fp32, on the tiny ComfyUI-loadable checkpoints of
scripts/tiny_models.py; the same file is loaded for diffusers by `load_base_model`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import host, tiny_models

from trainers.adapters import add_text_encoder_lora, add_unet_lora, lora_layers, lora_parameters
from trainers.config import LoraConfig, ModelConfig
from trainers.export.lora import kohya_lora_state, save_lora
from trainers.models.loading import BaseModel, load_base_model

LORA = LoraConfig(rank=4, alpha=2, targets="all", conv_rank=2, conv_alpha=3)
PROMPT = "a photo of sks dog next to a red disc"
TOLERANCE = 1e-3  # relative error in fp32


@dataclass
class Case:
    family: str
    algorithm: str
    base: BaseModel
    """diffusers modules with our LoRA active"""
    lora_path: Path
    comfy: object
    """the `comfy` package"""
    model: object
    clip: object
    patched_model: object
    patched_clip: object
    log: list[str] = field(default_factory=list)


def import_comfy():
    """ComfyUI's `comfy` package, imported from the host folder with the CPU forced.

    The host folder is on sys.path only while importing: its top-level `nodes`, `utils`... would shadow other modules
    of those names. ComfyUI's `comfy` is a namespace package, which any regular `comfy` package on sys.path (such as
    this suite's tests/comfy) beats wherever it stands: those folders are left out while importing.
    """
    folder = host.ensure_host()
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        assert Path(next(iter(loaded.__path__))).resolve().is_relative_to(folder.resolve()), \
            f"another `comfy` package is already imported: {loaded}"
    saved = list(sys.path)
    sys.path[:] = [str(folder)] + [p for p in saved if not (Path(p or ".") / "comfy" / "__init__.py").is_file()]
    try:
        cli_args = importlib.import_module("comfy.cli_args")
        cli_args.args.cpu = True
        for name in ("comfy.sd", "comfy.utils", "comfy.lora", "comfy.lora_convert", "comfy.model_management"):
            importlib.import_module(name)
    finally:
        sys.path[:] = saved
    return sys.modules["comfy"]


def fp16_exact_random_lora(*modules: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero weights where the adapter starts at zero (LoRA's up, LoHa's second pair, LoKr's first factor), and
    every adapter value representable in fp16, so that the fp16 file holds what diffusers computes with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in lora_parameters(module):
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)
                p.copy_(p.half().float())


def scale_magnitudes(*modules: torch.nn.Module, seed: int = 2) -> None:
    """DoRA starts each output row's magnitude at the base weight's row norm: scaled by 1 +- 10% per row, the file
    must carry the trained magnitudes, not only the direction."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for layer in lora_layers(module).values():
                magnitude = layer.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=generator))


@contextmanager
def adapters_disabled(*modules: torch.nn.Module):
    for module in modules:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in modules:
            module.enable_adapters()


class Captured(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


CASES = [("sd1", "lora"), ("sd1", "loha"), ("sd1", "lokr"), ("sd1", "dora"),
         pytest.param(("sdxl", "lora"), marks=pytest.mark.slow), pytest.param(("sdxl", "lokr"), marks=pytest.mark.slow)]
"""Every algorithm on SD1.5; LoRA and LoKr on the tiny SDXL (last: it takes several GB, and is loaded once)."""
_LOADED: dict[str, tuple] = {}
_WITHOUT_ADAPTER: dict[tuple[str, str], object] = {}


def without_adapter(case: Case, what: str, modules: tuple, compute):
    """`compute()` with the adapter of `modules` disabled: the plain model's output, the same for every case of the
    family (the inputs are seeded), so computed once per family."""
    key = (case.family, what)
    if key not in _WITHOUT_ADAPTER:
        with adapters_disabled(*modules):
            _WITHOUT_ADAPTER[key] = compute()
    return _WITHOUT_ADAPTER[key]


def loaded_models(comfy, family: str, checkpoint: Path) -> tuple:
    """Our diffusers model and ComfyUI's model and CLIP of `family`'s tiny checkpoint, loaded once for all its
    cases (ComfyUI patches clones; ours gets each case's adapter and loses it again); one family is kept."""
    if family not in _LOADED:
        _LOADED.clear()
        fp32 = {"dtype": torch.float32}
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False,
                                                                  model_options=fp32, te_model_options=fp32)
        _LOADED[family] = load_base_model(ModelConfig(base=str(checkpoint)), dtype=torch.float32), model, clip
    return _LOADED[family]


def remove_adapters(*modules: torch.nn.Module) -> None:
    """Back to the plain modules: peft's layers replaced by their base layers, the adapter configs forgotten."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for module in modules:
        recurse_remove_peft_layers(module)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            module.__dict__.pop(attribute, None)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def case(request, tmp_path_factory):
    family, algorithm = request.param
    comfy = import_comfy()
    checkpoint = tiny_models.comfy_checkpoint(family)

    base, model, clip = loaded_models(comfy, family, checkpoint)
    settings = dataclasses.replace(LORA, algorithm=algorithm, lokr_factor=8)
    add_unet_lora(base.unet, settings)
    for text_encoder in base.text_encoders:
        add_text_encoder_lora(text_encoder, settings)
    # LoHa's and LoKr's zero-started factor multiplies other small factors: larger values make a visible change
    fp16_exact_random_lora(base.unet, *base.text_encoders, scale=0.5 if algorithm in ("loha", "lokr") else 0.05)
    if algorithm == "dora":
        scale_magnitudes(base.unet, *base.text_encoders)
    state = kohya_lora_state(base.unet, base.text_encoders, te_prefixes=base.family.kohya_text_encoder_prefixes)
    lora_path = save_lora(tmp_path_factory.mktemp("lora") / f"{family}-{algorithm}.safetensors", state,
                          {"modelspec.title": f"{family} {algorithm} test"})

    log: list[str] = []
    handler = Captured(log)
    logging.getLogger().addHandler(handler)
    try:
        lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    yield Case(family, algorithm, base, lora_path, comfy, model, clip, patched_model, patched_clip, log)
    remove_adapters(base.unet, *base.text_encoders)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_comfyui_uses_every_key_of_a_lora_trained_with_the_memory_levers(tmp_path):
    """Parked encoders, fp8 frozen weights and gradient checkpointing change how the UNet is stored and run, not the
    names of what is exported (tests/unit/test_memory_levers.py compares each lever's file with the plain run's):
    one step with all three on the ComfyUI-loadable checkpoint gives a file ComfyUI uses every key of."""
    from tests.unit.train_helpers import make_images, one_torch_thread
    from trainers.config import Config
    from trainers.loop import train

    comfy, checkpoint = import_comfy(), tiny_models.comfy_checkpoint("sd1")
    with contextmanager(one_torch_thread)():
        result = train(Config.from_dict({
            "model": {"base": str(checkpoint)},
            "data": {"folder": str(make_images(tmp_path / "images")), "resolution": 64, "buckets": False},
            "train": {"steps": 1, "offload_encoders": "on", "fp8_base": "on", "gradient_checkpointing": True},
            "lora": {"rank": 4, "alpha": 4}, "output": {"dir": str(tmp_path / "runs"), "tensorboard": False}}))
    _, model, clip = loaded_models(comfy, "sd1", checkpoint)
    log: list[str] = []
    handler = Captured(log)
    logging.getLogger().addHandler(handler)
    try:
        lora = comfy.utils.load_torch_file(result.outputs["model"], safe_load=True)
        patched_model, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [line for line in log if "lora key not loaded" in line or "NOT LOADED" in line]
    assert len(patched_model.patches) == len({key.split(".", 1)[0] for key in lora}) > 0


def test_comfyui_uses_every_key_of_the_file(case: Case):
    assert not [line for line in case.log if "lora key not loaded" in line or "NOT LOADED" in line]
    comfy = case.comfy
    lora = load_file(case.lora_path)
    key_map = comfy.lora.model_lora_keys_unet(case.model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(case.clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)

    modules = {key.split(".", 1)[0] for key in lora}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    assert len(unet_modules) == len(lora_layers(case.base.unet))
    convolutions = [m for m in unet_modules if "resnets" in m and m.endswith(("_conv1", "_conv2"))]
    assert convolutions  # convolutions (LoCon, or LoHa/LoKr on convolutions) are in the file...
    if case.algorithm in ("lora", "dora"):
        assert all(lora[f"{m}.lora_down.weight"].shape[-1] == 3 for m in convolutions)
    assert (case.algorithm == "dora") == all(f"{m}.dora_scale" in lora for m in modules)
    assert len(patches) == len(modules)  # ...and every module, UNet and text encoders, maps onto a weight
    patched = set(case.patched_model.patches) | set(case.patched_clip.patcher.patches)
    assert set(patches) <= patched
    text_prefixes = tuple(p + "_" for p in case.base.family.kohya_text_encoder_prefixes)
    assert len(case.patched_clip.patcher.patches) == len({m for m in modules if m.startswith(text_prefixes)}) > 0


def test_patched_unet_matches_diffusers_with_the_lora(case: Case):
    unet, mm = case.base.unet, case.comfy.model_management
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    timestep = torch.tensor([500.0])
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    added, adm = None, {}
    if unet.config.addition_embed_type == "text_time":
        text_embeds = torch.randn(1, 1280, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        # ComfyUI's `y` is what diffusers feeds its add_embedding: pooled text and the embedded size/crop ids
        adm = {"y": torch.cat([text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=-1)}

    def run_unet():
        return unet(latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample

    with torch.no_grad():
        expected = run_unet()
        without_lora = without_adapter(case, "unet", (unet,), run_unet)
        mm.load_models_gpu([case.patched_model])
        patched = case.patched_model.model.diffusion_model(latents, timesteps=timestep, context=context, **adm)

    assert relative_error(patched, expected) < TOLERANCE
    assert relative_error(without_lora, expected) > 100 * TOLERANCE  # the LoRA does change the output


def test_patched_clip_matches_diffusers_with_the_lora(case: Case):
    family, base = case.base.family, case.base
    def encode():
        return family.encode_prompts(base.text_encoders, base.tokenizers, [PROMPT])

    with torch.no_grad():
        expected = encode()
        without_lora = without_adapter(case, "clip", tuple(base.text_encoders), encode)
        cond, pooled = case.patched_clip.encode_from_tokens(case.patched_clip.tokenize(PROMPT), return_pooled=True)

    assert cond.shape == expected.hidden_states.shape
    assert relative_error(cond, expected.hidden_states) < TOLERANCE
    assert relative_error(without_lora.hidden_states, expected.hidden_states) > 100 * TOLERANCE
    if expected.pooled is not None:
        assert relative_error(pooled, expected.pooled) < TOLERANCE

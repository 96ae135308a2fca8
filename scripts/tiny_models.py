"""Small random Stable Diffusion models for tests and the demo: nothing is downloaded, everything is built here.

    python scripts/tiny_models.py --comfy DIR [--family sd1 --family sdxl ...]   # install into a ComfyUI folder

Each builder is deterministic from its seed. Results are cached under `.cache/tiny_models/`, keyed by a hash of
the builder's parameters, `FORMAT`, torch's version and the exporter's code; a build happens in a temporary
folder that is renamed into place, under a lock, so two processes asking at once build once.

Families: "sd1" (SD1.5), "sd2v" (SD2.x 768-v), "sdxl".

- `tiny_pipeline_dir` / `tiny_single_file`: UNet, VAE and CLIP text encoders a few layers deep (the real CLIP
  tokenizer, so the text encoders keep the 49408-token vocabulary): a LoRA step takes a fraction of a second on a
  CPU at 64x64. Not loadable by ComfyUI, whose text encoders and VAE have fixed sizes.
- `comfy_checkpoint`: full-size VAE and text encoders (random), a small UNet that ComfyUI still recognises.
  Measured (random weights; build times on a busy 2-core CPU):
    sd1  SD15 (EPS): UNet (320, 640) x 1 layer, 80 M params; fp16; 0.57 GB; about 15 s to build.
    sd2v SD20 (V_PREDICTION): UNet 4 levels of 320 x 2 layers (ComfyUI reads v-prediction off output block 11,
         so 12 output blocks are needed), 87 M params; fp8 matrices; 0.53 GB; about 35 s.
    sdxl KOALA_700M (an SDXL model class, same latents and text encoders): UNet 3 levels of 320 x 1 layer,
         transformer depths (0, 2, 5), no middle block, 106 M params; fp8 matrices; 1.01 GB; about 60 s at 6.3 GB
         peak memory. This is the smallest SDXL-family file that loads without missing-key warnings to within a
         few percent: ComfyUI fixes the text encoders (CLIP-L 123 M + OpenCLIP-bigG 695 M params) and the VAE
         (84 M), 0.9 GB of the file even in fp8; a UNet without attention in its decoder would save 5 % more but
         leave the up blocks' attention, which LoRA tests exercise, untested.
  fp8 storage (matrices in float8_e4m3fn, vectors in fp16) loads cleanly in ComfyUI and diffusers alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainers.config import ModelConfig  # noqa: E402
from trainers.export.checkpoint import save_single_file  # noqa: E402
from trainers.models.families import SD1, SD2, SDXL, Family  # noqa: E402
from trainers.models.from_original import read_config  # noqa: E402
from trainers.models.loading import BaseModel, build_pipeline, load_base_model  # noqa: E402

CACHE = REPO / ".cache" / "tiny_models"
FAMILIES: dict[str, tuple[Family, str]] = {"sd1": (SD1, "epsilon"), "sd2v": (SD2, "v_prediction"),
                                           "sdxl": (SDXL, "epsilon")}
COMFY_NAMES = {"sd1": "tiny-sd15.safetensors", "sd2v": "tiny-sd21-v.safetensors", "sdxl": "tiny-sdxl.safetensors"}
BLIP_NAME = "tiny-blip"
FORMAT = 1
"""Bump when a builder's output changes (the parameters alone would not show it)."""
_EXPORTER = REPO / "trainers" / "export" / "checkpoint.py"

_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
         "projection_dim": 32}
# SDXL's two encoders differ in width, as in the real model (diffusers' single-file loader relies on it)
_TINY_TEXT = {"text_encoder": _CLIP, "text_encoder_2": {**_CLIP, "hidden_size": 48, "intermediate_size": 96}}
_TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}
_TINY_UNETS = {
    "sd1": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "sample_size": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "sdxl": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32 + 48, "sample_size": 8,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32},
}
# 12 output blocks, so that v-prediction shows in output block 11 as in the real SD2.x models
_TINY_UNETS["sd2v"] = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 32,
                       "sample_size": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
_COMFY_UNETS = {
    "sd1": {"block_out_channels": [320, 640], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    # ComfyUI reads v-prediction off output block 11, so the UNet needs 12 output blocks
    "sd2v": {"block_out_channels": [320] * 4, "layers_per_block": 2,
             "down_block_types": ["CrossAttnDownBlock2D"] + ["DownBlock2D"] * 3,
             "up_block_types": ["UpBlock2D"] * 3 + ["CrossAttnUpBlock2D"]},
    # ComfyUI's KOALA_700M: transformer depths exactly (0, 2, 5), one resnet per level
    "sdxl": {"block_out_channels": [320] * 3, "layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5],
             "mid_block_type": None},
}
_COMFY_DTYPES = {"sd1": torch.float16, "sd2v": torch.float8_e4m3fn, "sdxl": torch.float8_e4m3fn}


# ---- the cache ---------------------------------------------------------------------------------------------
def cached(kind: str, params: dict, build: Callable[[Path], None], *, root: Path | None = None) -> Path:
    """The folder `build` fills for these parameters, built once (atomically, under a lock) in `root` (default
    `CACHE`) and then reused."""
    root = CACHE if root is None else root
    key = {**params, "format": FORMAT, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode() + _EXPORTER.read_bytes())
    final = root / f"{kind}-{digest.hexdigest()[:16]}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            with torch.random.fork_rng():
                torch.manual_seed(params.get("seed", 0))
                build(staging)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- building models ---------------------------------------------------------------------------------------
def _family(name: str) -> tuple[Family, str]:
    if name not in FAMILIES:
        raise ValueError(f"unknown tiny model family {name!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def random_model(name: str, *, unet: dict, text: dict[str, dict], vae: dict) -> BaseModel:
    """A BaseModel of family `name` with random weights: the shipped configs with the given sizes on top
    (`text` by text encoder subfolder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    family, prediction_type = _family(name)
    config_dir = family.config_dir_for(prediction_type)
    unet_config = {**read_config(config_dir, "unet"), **unet}
    unet_config["attention_head_dim"] = [family.unet_attention_heads(c) for c in unet_config["block_out_channels"]]
    model = UNet2DConditionModel.from_config(unet_config)
    if prediction_type == "v_prediction":  # as in real v-models; ComfyUI tells SD2 v from eps by this spread
        for module in model.modules():
            if module.__class__.__name__ == "BasicTransformerBlock":
                torch.nn.init.normal_(module.norm1.bias, std=0.3)
    encoders = [spec.model_class(spec.model_class.config_class.from_dict({**read_config(config_dir, spec.subfolder),
                                                                          **text.get(spec.subfolder, {})}))
                for spec in family.text_encoder_specs]
    scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler")
    return BaseModel(family=family, prediction_type=prediction_type, unet=model.eval(),
                     vae=AutoencoderKL.from_config({**read_config(config_dir, "vae"), **vae}).eval(),
                     text_encoders=[e.eval() for e in encoders], tokenizers=family.load_tokenizers(),
                     noise_scheduler=scheduler, source=f"random {name}")


def tiny_pipeline_dir(family: str = "sd1", seed: int = 0) -> Path:
    """A diffusers folder (a few MB) of a tiny random model: fast unit tests of the trainer."""
    params = {"family": family, "seed": seed, "unet": _TINY_UNETS[_check(family)], "text": _TINY_TEXT,
              "vae": _TINY_VAE}

    def build(folder: Path) -> None:
        base = random_model(family, unet=params["unet"], text=_TINY_TEXT, vae=_TINY_VAE)
        build_pipeline(base).save_pretrained(folder, safe_serialization=True)

    return cached(f"pipeline-{family}", params, build)


def tiny_single_file(family: str = "sd1", seed: int = 0) -> Path:
    """`tiny_pipeline_dir(family, seed)` as one file in the original layout (fp32), for the loader's tests."""
    source = tiny_pipeline_dir(family, seed)

    def build(folder: Path) -> None:
        save_single_file(folder / "model.safetensors", load_base_model(ModelConfig(base=str(source))),
                         dtype=torch.float32)

    return cached(f"single-{family}", {"source": source.name, "seed": seed}, build) / "model.safetensors"


def comfy_checkpoint(family: str = "sd1", seed: int = 0) -> Path:
    """A single file ComfyUI loads without warnings: full-size VAE and text encoders, a small UNet (see above)."""
    params = {"family": family, "seed": seed, "unet": _COMFY_UNETS[_check(family)], "dtype": _COMFY_DTYPES[family]}

    def build(folder: Path) -> None:
        base = random_model(family, unet=params["unet"], text={}, vae={})
        save_single_file(folder / "model.safetensors", base, dtype=params["dtype"],
                         metadata={"modelspec.title": f"random {family} for tests"})

    return cached(f"comfy-{family}", params, build) / "model.safetensors"


def _check(family: str) -> str:
    _family(family)
    return family


def tiny_blip_dir(seed: int = 0) -> Path:
    """A tiny random BLIP captioner with its processor, loadable with `from_pretrained(local_files_only=True)`."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
        "a an the of on in with and photo picture drawing red blue green yellow white black small big toy robot "
        "disc dog cat person house tree car").split()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    params = {"seed": seed, "words": words, "sizes": sizes}

    def build(folder: Path) -> None:
        from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

        (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), bos_token="[DEC]")
        (folder / "vocab.txt").unlink()
        text = {**sizes, "vocab_size": len(words), "encoder_hidden_size": 32, "max_position_embeddings": 64,
                "pad_token_id": 0, "bos_token_id": words.index("[DEC]"), "eos_token_id": words.index("[SEP]"),
                "sep_token_id": words.index("[SEP]")}
        config = BlipConfig(text_config=text, vision_config={**sizes, "image_size": 32, "patch_size": 8},
                            projection_dim=32, image_text_hidden_size=32)
        BlipForConditionalGeneration(config).save_pretrained(folder)
        BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)

    return cached("blip", params, build)


# ---- installing into ComfyUI -------------------------------------------------------------------------------
def install_into(comfyui_dir: Path, *, families: tuple[str, ...] = ("sd1",)) -> dict[str, Path]:
    """Link (or copy) `comfy_checkpoint(f)` into models/checkpoints/ and the tiny BLIP into models/blip/;
    returns {family or "blip": installed path}."""
    models = Path(comfyui_dir) / "models"
    installed = {family: link(comfy_checkpoint(family), models / "checkpoints" / COMFY_NAMES[family])
                 for family in families}
    installed["blip"] = link(tiny_blip_dir(), models / "blip" / BLIP_NAME)
    return installed


def link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() and target.resolve() == source.resolve():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        os.symlink(source, staging, target_is_directory=source.is_dir())
    except OSError:  # no symlinks here (e.g. Windows without developer mode)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, staging)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy", type=Path, required=True, help="the ComfyUI folder (the one holding models/)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="checkpoint families to install (repeatable; default sd1)")
    args = parser.parse_args(argv)
    for name, path in install_into(args.comfy, families=tuple(args.family or ["sd1"])).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

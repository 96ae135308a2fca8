"""Rewards for DDPO: a score per generated image (higher is better).

jpeg_compressibility / jpeg_incompressibility need no weights (Black et al. 2023: minus / plus the JPEG size in kB).
aesthetic (the LAION aesthetic predictor: an MLP on CLIP image embeddings), clip_score (prompt-image cosine similarity)
and blip_score (BLIP's image-text matching probability) use weights the user has: a local transformers folder (or a hub
id when online) in `ddpo.reward_model`, and for aesthetic the predictor's file in `ddpo.aesthetic_head`.
reference_similarity rewards looking like the images in `ddpo.reference_folder` (in a graph: any IMAGE wired into the
DDPO Reward node): by colour and layout without weights, or by CLIP image embedding with a CLIP `ddpo.reward_model`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import DDPOConfig
from .data.images import IMAGE_EXTENSIONS, load_image, pil_to_uint8_tensor
from .errors import ConfigError, DataError, ModelError

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""(images (B, 3, H, W) in [0, 1], prompts) -> rewards (B,) as float32 on the CPU."""


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return jpeg_kilobytes(images)


class AestheticReward:
    """LAION's improved aesthetic predictor: L2-normalised CLIP image embedding -> 5 linear layers -> score (1-10)."""

    def __init__(self, clip_model: str, head_file: str, device: torch.device):
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = device
        head = _read_aesthetic_head(Path(head_file))
        self.clip = _load(CLIPModel, clip_model, "ddpo.reward_model").to(device).eval()
        self.processor = _load(CLIPImageProcessor, clip_model, "ddpo.reward_model")
        self.head = _aesthetic_head(head, self.clip.config.projection_dim, where=f"ddpo.aesthetic_head = {head_file}")
        self.head.to(device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=to_pil(images), return_tensors="pt").to(self.device)
        embeds = self.clip.get_image_features(**inputs).pooler_output.float()  # projected, as CLIP.encode_image
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).squeeze(-1).float().cpu()


class ClipScoreReward:
    """Cosine similarity of CLIP's image and prompt embeddings (-1..1; ≈0.3 for a good match with CLIP ViT-L/14)."""

    def __init__(self, clip_model: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.model = _load(CLIPModel, clip_model, "ddpo.reward_model").to(device).eval()
        self.processor = _load(CLIPProcessor, clip_model, "ddpo.reward_model")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=to_pil(images), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        out = self.model(**inputs)
        image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).float().cpu()


class BlipScoreReward:
    """BLIP's image-text matching head: the probability (0..1) that the image shows the prompt."""

    def __init__(self, blip_model: str, device: torch.device):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.device = device
        self.model = _load(BlipForImageTextRetrieval, blip_model, "ddpo.reward_model").to(device).eval()
        self.processor = _load(BlipProcessor, blip_model, "ddpo.reward_model")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=to_pil(images), text=prompts, return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        logits = self.model(**inputs, use_itm_head=True).itm_score
        return logits.float().softmax(dim=-1)[:, 1].cpu()


class ReferenceSimilarity:
    """How much each image looks like the reference images, 0..1 (mean over the references). Without a model:
    half colour (intersection of 4x4x4-bin colour histograms), half layout (1 - mean absolute difference of 8x8
    thumbnails). With a CLIP folder: cosine similarity of CLIP image embeddings to the references' mean embedding."""

    THUMBNAIL = 8
    BINS = 4

    def __init__(self, folder: str, device: torch.device, clip_model: str = ""):
        self.device = device
        references = load_reference_images(Path(folder).expanduser())
        self.clip = self.processor = None
        if clip_model:
            from transformers import CLIPImageProcessor, CLIPModel

            self.clip = _load(CLIPModel, clip_model, "ddpo.reward_model").to(device).eval()
            self.processor = _load(CLIPImageProcessor, clip_model, "ddpo.reward_model")
            target = self._clip_embeds(references).mean(0)
            self.target = target / target.norm()
        else:
            self.hists = torch.stack([self._histogram(r[None])[0] for r in references])
            self.thumbs = torch.stack([self._thumbnail(r[None])[0] for r in references])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = images.detach().float().clamp(0, 1).cpu()
        if self.clip is not None:
            return (self._clip_embeds(list(images)) @ self.target).float().cpu()
        colour = torch.minimum(self._histogram(images)[:, None], self.hists[None]).sum(-1)  # (B, R)
        layout = 1 - (self._thumbnail(images)[:, None] - self.thumbs[None]).abs().flatten(2).mean(-1)
        return (0.5 * colour + 0.5 * layout).mean(1)

    def _histogram(self, images: torch.Tensor) -> torch.Tensor:
        bins = (images * self.BINS).long().clamp(max=self.BINS - 1)
        index = (bins[:, 0] * self.BINS + bins[:, 1]) * self.BINS + bins[:, 2]
        counts = torch.stack([torch.bincount(i.flatten(), minlength=self.BINS ** 3) for i in index]).float()
        return counts / counts.sum(-1, keepdim=True)

    def _thumbnail(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, self.THUMBNAIL)

    @torch.no_grad()
    def _clip_embeds(self, images: list[torch.Tensor]) -> torch.Tensor:
        inputs = self.processor(images=to_pil(torch.stack([_square(i) for i in images])), return_tensors="pt")
        embeds = self.clip.get_image_features(**inputs.to(self.device)).pooler_output.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


def _square(image: torch.Tensor, side: int = 224) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True)[0]


def load_reference_images(folder: Path) -> list[torch.Tensor]:
    """The folder's images as (3, H, W) tensors in [0, 1], at most 256 px on the long side."""
    where = f"ddpo.reference_folder = {folder}"
    if not folder.is_dir():
        raise DataError("the reference image folder does not exist",
                        "give a folder of the images the samples should come to look like", where=where)
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        image = load_image(path)  # a DataError naming the file when it cannot be read
        image.thumbnail((256, 256))
        images.append(pil_to_uint8_tensor(image).float() / 255)
    if not images:
        raise DataError("the reference image folder holds no images", "add the images the samples should come to "
                        f"look like ({', '.join(sorted(IMAGE_EXTENSIONS))})", where=where)
    return images


def make_reward(cfg: DDPOConfig, device: torch.device) -> Reward:
    """The reward `ddpo.reward` names, with its weights loaded (a clear ModelError when they cannot be)."""
    if cfg.reward == "jpeg_compressibility":
        return jpeg_compressibility
    if cfg.reward == "jpeg_incompressibility":
        return jpeg_incompressibility
    if cfg.reward == "aesthetic":
        return AestheticReward(cfg.reward_model, cfg.aesthetic_head, device)
    if cfg.reward == "clip_score":
        return ClipScoreReward(cfg.reward_model, device)
    if cfg.reward == "blip_score":
        return BlipScoreReward(cfg.reward_model, device)
    if cfg.reward == "reference_similarity":
        return ReferenceSimilarity(cfg.reference_folder, device, cfg.reward_model.strip())
    raise ConfigError(f"unknown reward {cfg.reward!r}", "see ddpo.reward", where="ddpo.reward")


def _load(cls, source: str, field: str):
    path = Path(source).expanduser()
    local = path.exists() or source.startswith((".", "/", "~")) or "\\" in source
    if local and not path.is_dir():
        raise ModelError("the reward model folder does not exist", "download the model into a folder (config.json, "
                         "weights, tokenizer and preprocessor files) and give its path", where=f"{field} = {source}")
    try:
        return cls.from_pretrained(str(path) if local else source, local_files_only=local)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a model of another kind or size
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the reward model ({first_line})",
                         "set it to a local folder in the transformers layout (config.json, weights, tokenizer and "
                         "preprocessor files), e.g. a download of openai/clip-vit-large-patch14 or "
                         "Salesforce/blip-itm-base-coco", where=f"{field} = {source}") from None


def _read_aesthetic_head(path: Path) -> dict[str, torch.Tensor]:
    where = f"ddpo.aesthetic_head = {path}"
    if not path.is_file():
        raise ModelError("the aesthetic predictor file does not exist",
                         "download sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor)", where=where)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: pickle, zip or safetensors errors alike
        raise ModelError(f"cannot read the aesthetic predictor ({type(exc).__name__})",
                         "download the file again", where=where) from None
    return {k.removeprefix("model."): v for k, v in state.items()} if isinstance(state, dict) else {}


def _aesthetic_head(state: dict[str, torch.Tensor], embed_dim: int, *, where: str) -> torch.nn.Module:
    """The predictor's MLP: Linear layers at indices 0, 2, 4, 6 and 7 (dropouts between the first four)."""
    layers = (0, 2, 4, 6, 7)
    if any(not isinstance(state.get(f"layers.{i}.weight"), torch.Tensor) for i in layers) \
            or state["layers.0.weight"].shape[1] != embed_dim:
        raise ModelError(f"not a LAION aesthetic predictor for {embed_dim}-wide CLIP embeddings",
                         "use the predictor made for the CLIP model in ddpo.reward_model (ViT-L/14: 768)", where=where)
    widths = [embed_dim] + [state[f"layers.{i}.weight"].shape[0] for i in layers]
    head = torch.nn.Sequential(
        torch.nn.Linear(widths[0], widths[1]), torch.nn.Dropout(0.2), torch.nn.Linear(widths[1], widths[2]),
        torch.nn.Dropout(0.2), torch.nn.Linear(widths[2], widths[3]), torch.nn.Dropout(0.1),
        torch.nn.Linear(widths[3], widths[4]), torch.nn.Linear(widths[4], widths[5]))
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items() if k.startswith("layers.")})
    return head

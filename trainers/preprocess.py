"""Control maps for ControlNet, computed on torch tensors: what the generation node shows and conditions on, and what
ControlNet training derives from its images.

Images are (B, H, W, 3) in [0, 1], ComfyUI's IMAGE layout; every map comes back in the same layout and range, at
the same size. All methods but depth and normal need no weights; those two run a transformers depth-estimation model
(DPT, Depth Anything, ...) from a folder the user has downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, ModelError

PREPROCESSORS = ("none", "canny", "soft_edge", "scribble", "threshold", "grayscale", "shuffle", "depth", "normal")
NEEDS_DEPTH_MODEL = ("depth", "normal")
DEPTH_MODEL_FILES = "config.json, preprocessor_config.json and the weights (model.safetensors)"

_LUMA = (0.299, 0.587, 0.114)
# A step from black to white makes a Sobel response of 4 on the pixels beside it: dividing by 4 puts gradient
# magnitudes (and so Canny's thresholds) in units of "a full black-to-white step".
_SOBEL_STEP = 4.0
_EDGE_FLOOR = 1e-3
"""Gradients weaker than this (a quarter of one 8-bit level) are rounding noise, not edges to scale up."""
_SHUFFLE_CELL = 256
"""Side in pixels of one cell of the random flow field (ControlNet's content shuffle uses 256)."""


@dataclass(frozen=True)
class PreprocessOptions:
    low_threshold: float = 0.1
    """canny: gradients above this continue an edge (fraction of a black-to-white step)."""
    high_threshold: float = 0.2
    """canny: gradients above this start an edge."""
    threshold: float = 0.5
    """threshold: brightness cut; scribble: edge-strength cut (fraction of the strongest edge)."""
    blur: float = 1.0
    """Gaussian sigma in pixels: smoothing before canny, soft edge and scribble (0 = none)."""
    seed: int = 0
    """shuffle: the random flow field."""


def control_map(images: torch.Tensor, method: str, options: PreprocessOptions = PreprocessOptions(), *,
                depth_model: "DepthEstimator | None" = None) -> torch.Tensor:
    """The control map of each image for `method` (one of PREPROCESSORS)."""
    check_images(images)
    check_options(method, options)
    if method in NEEDS_DEPTH_MODEL and depth_model is None:
        raise ConfigError(f"the {method} preprocessor needs a depth-estimation model",
                          f"download one ({DEPTH_MODEL_FILES}) into a folder and pass it", where="depth_model")
    images = images.float()
    if method == "none":
        return images.clamp(0, 1)
    if method == "shuffle":
        return content_shuffle(images, options.seed)
    if method in NEEDS_DEPTH_MODEL:
        depth = depth_model(images)
        return _as_rgb(depth) if method == "depth" else normal_from_depth(depth)
    return _as_rgb(_FROM_BRIGHTNESS[method](luminance(images), options))


def check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"expected images shaped (batch, height, width, 3), got {tuple(images.shape)}",
                          "pass RGB images", where="image")
    if images.numel() == 0:
        raise ConfigError(f"the image batch is empty ({tuple(images.shape)})",
                          "connect at least one image of at least 1×1 pixels", where="image")


def check_options(method: str, options: PreprocessOptions) -> None:
    if method not in PREPROCESSORS:
        raise ConfigError(f"unknown preprocessor {method!r}", f"use one of: {', '.join(PREPROCESSORS)}",
                          where="preprocessor")
    if method == "canny" and not 0 <= options.low_threshold <= options.high_threshold:
        raise ConfigError(f"low_threshold {options.low_threshold} is above high_threshold {options.high_threshold}",
                          "set low_threshold to at most high_threshold", where="low_threshold")
    if options.blur < 0:
        raise ConfigError(f"blur is {options.blur}", "use 0 (no smoothing) or a positive sigma", where="blur")


# ---- building blocks (B, 1, H, W) --------------------------------------------------------------------------------
def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 1, H, W) brightness."""
    weights = images.new_tensor(_LUMA)
    return (images * weights).sum(-1).unsqueeze(1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # Reflect padding needs the pad smaller than the side; replicate works for any size.
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical gradients (x to the right, y down)."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(2, 3))


def gradient_magnitude(gray: torch.Tensor, blur: float) -> torch.Tensor:
    gx, gy = sobel(gaussian_blur(gray, blur))
    return torch.hypot(gx, gy) / _SOBEL_STEP


def _normalised(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Each image divided by its own maximum; an image whose maximum is not above `floor` becomes black."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > floor, x / peak.clamp_min(1e-12), torch.zeros_like(x))


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, H, W, 3), clamped to [0, 1]."""
    return x.clamp(0, 1).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


# ---- edges ---------------------------------------------------------------------------------------------------
def canny(gray: torch.Tensor, low: float, high: float, blur: float = 1.0) -> torch.Tensor:
    """Canny edges (1 on edges, 0 elsewhere): Gaussian blur, Sobel, non-maximum suppression along the gradient,
    double threshold, and hysteresis (weak edges kept only where connected to a strong one)."""
    gx, gy = sobel(gaussian_blur(gray, blur))
    magnitude = torch.hypot(gx, gy) / _SOBEL_STEP
    thin = magnitude * _is_ridge(magnitude, gx, gy)
    strong = thin >= high
    weak = thin >= low
    return _hysteresis(strong, weak).float()


# Neighbour offsets (dy, dx) one step along the gradient, for its direction quantised to 45° sectors (0° points
# right, 90° down: y grows downwards as rows do).
_ALONG = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _is_ridge(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Where the magnitude is a local maximum across the edge. On a tie (an edge exactly between two pixels) the
    pixel on the bright side wins, so edges come out one pixel thin and hug the bright side on every side."""
    sector = (torch.round(torch.rad2deg(torch.atan2(gy, gx)) / 45.0) % 8).long()
    # Rounding makes the two sides of an exact tie differ in the last bits: compare with a tolerance.
    tolerance = 1e-5 * magnitude.amax(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]
    ridge = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(_ALONG):
        ahead = padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        behind = padded[..., 1 - dy:1 - dy + height, 1 - dx:1 - dx + width]
        ridge |= (sector == index) & (magnitude >= behind - tolerance) & (magnitude > ahead + tolerance)
    return ridge & (magnitude > _EDGE_FLOOR)


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Grow the strong edges through 8-connected weak pixels until nothing changes."""
    edges = strong & weak
    while True:
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def soft_edge(gray: torch.Tensor, blur: float = 1.0) -> torch.Tensor:
    """Soft edges without a HED network: the Sobel magnitude of the smoothed image, smoothed again so the lines
    have soft shoulders, each image scaled so its strongest edge is white."""
    return _normalised(gaussian_blur(gradient_magnitude(gray, blur), blur / 2), _EDGE_FLOOR)


def scribble(gray: torch.Tensor, threshold: float = 0.5, blur: float = 1.0) -> torch.Tensor:
    """Scribble-like lines: edges stronger than `threshold` (of the strongest edge), thickened to a few pixels
    (thicker for larger images) as hand-drawn strokes are."""
    edges = (_normalised(gradient_magnitude(gray, blur), _EDGE_FLOOR) >= threshold).float()
    radius = max(1, round(min(gray.shape[-2:]) / 256))
    return F.max_pool2d(edges, 2 * radius + 1, stride=1, padding=radius)


_FROM_BRIGHTNESS = {
    "canny": lambda gray, o: canny(gray, o.low_threshold, o.high_threshold, o.blur),
    "soft_edge": lambda gray, o: soft_edge(gray, o.blur),
    "scribble": lambda gray, o: scribble(gray, o.threshold, o.blur),
    "threshold": lambda gray, o: (gray >= o.threshold).float(),
    "grayscale": lambda gray, o: gray,
}


# ---- shuffle --------------------------------------------------------------------------------------------------
def content_shuffle(images: torch.Tensor, seed: int) -> torch.Tensor:
    """ControlNet's content shuffle: every pixel is taken from a place given by a smooth random flow field, which
    keeps colours and textures but scrambles the layout. The same seed gives the same shuffle."""
    batch, height, width, _ = images.shape
    generator = torch.Generator().manual_seed(int(seed))
    cell = _SHUFFLE_CELL
    noise = torch.rand((batch, 2, height // cell + 2, width // cell + 2), generator=generator)
    field = F.interpolate(noise, size=(height + 2 * cell, width + 2 * cell), mode="bicubic", align_corners=False)
    field = field[..., cell:cell + height, cell:cell + width]
    grid = (_normalised(field - field.amin(dim=(1, 2, 3), keepdim=True)) * 2 - 1).permute(0, 2, 3, 1)
    picked = F.grid_sample(images.permute(0, 3, 1, 2), grid.to(images.device), mode="bilinear",
                           padding_mode="border", align_corners=True)
    return picked.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


# ---- depth and normals ------------------------------------------------------------------------------------------
class DepthEstimator:
    """A transformers depth-estimation model from a local folder; calling it gives (B, 1, H, W) relative depth in
    [0, 1] per image, near = bright (the convention of ControlNet's depth models)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelError("no depth-estimation model here (config.json is missing)",
                             f"download a model such as Intel/dpt-hybrid-midas or "
                             f"depth-anything/Depth-Anything-V2-Small-hf ({DEPTH_MODEL_FILES}) into this folder",
                             where=str(folder))
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the depth-estimation model ({exc})",
                             f"the folder needs {DEPTH_MODEL_FILES} of one transformers depth model",
                             where=str(folder)) from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1:3]
        inputs = self.processor(images=list(images.float().cpu().numpy()), return_tensors="pt", do_rescale=False)
        predicted = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype)).predicted_depth
        depth = F.interpolate(predicted.float().unsqueeze(1), size=(height, width), mode="bicubic", align_corners=False)
        return _normalised(depth - depth.amin(dim=(1, 2, 3), keepdim=True)).cpu()

    def close(self) -> None:
        """Let go of the weights (and the GPU memory they held)."""
        self.model.to("cpu")
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def normal_from_depth(depth: torch.Tensor) -> torch.Tensor:
    """Surface normals of a (B, 1, H, W) depth map in [0, 1] (near = bright) as an RGB map: x to the right, y up,
    z towards the viewer, each mapped from [-1, 1] to [0, 1]; a flat background is (0.5, 0.5, 1)."""
    # The depth range counts as deep as the image is wide, so slopes look natural whatever the resolution.
    scale = min(depth.shape[-2:]) / (2 * 4.0)
    gx, gy = sobel(depth)
    normal = torch.cat([-gx * scale, gy * scale, torch.ones_like(gx)], dim=1)
    normal = normal / normal.norm(dim=1, keepdim=True)
    return (normal * 0.5 + 0.5).permute(0, 2, 3, 1).clamp(0, 1).contiguous()

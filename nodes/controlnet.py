"""ControlNet Condition: a control image, turned into a control map by a preprocessor, conditions generation through
a ControlNet from models/controlnet, applied as ComfyUI's Apply ControlNet applies it.

The map is made at the control image's own size; at sampling time ComfyUI scales it to the latent's size (cropping
the middle when the aspect ratio differs), so any size works and matching the output size keeps thin lines intact.
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..trainers.errors import FinetuneError
from ..trainers.preprocess import NEEDS_DEPTH_MODEL, PREPROCESSORS, DepthEstimator, PreprocessOptions, control_map
from .caption import model_folder_path, model_folders
from .types import NodeError, node_error
from .validation import check_inputs

DEPTH_FOLDER = "depth_estimation"
NO_MODEL = "(none)"
PREPROCESS_INPUTS = {name: name for name in ("image", "preprocessor", "low_threshold", "blur", "depth_model")}

folder_paths.add_model_folder_path(DEPTH_FOLDER, os.path.join(folder_paths.models_dir, DEPTH_FOLDER))


class ControlNetCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        nets = folder_paths.get_filename_list("controlnet")
        depth_models = model_folders(DEPTH_FOLDER)
        return io.Schema(
            node_id="FinetuneControlNetCondition",
            display_name="ControlNet Condition",
            category="finetune/generate",
            description="Guides generation with a control image: the preprocessor turns it into a map (edges, "
                        "depth, ...) and a ControlNet from models/controlnet applies it to both conditionings. The "
                        "map is scaled to the latent's size when sampling.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
                io.Combo.Input("control_net", options=nets, default=nets[0] if nets else None,
                               tooltip="A ControlNet from models/controlnet, made for this checkpoint's family and "
                                       "for this kind of map (canny, depth, ...)."),
                io.Image.Input("image",
                               tooltip="The control image: one for the whole latent batch, or one per latent."),
                io.Combo.Input("preprocessor", options=list(PREPROCESSORS), default="canny",
                               tooltip="How the image becomes a control map: none (use it as it is), canny (thin "
                                       "edges), soft_edge, scribble, threshold, grayscale, shuffle (content "
                                       "shuffle), depth or normal (these two need a model in "
                                       f"models/{DEPTH_FOLDER})."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the map steers the image; 0 turns the ControlNet off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When the ControlNet starts acting, as a fraction of the sampling steps."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When the ControlNet stops acting; stopping early leaves the details free."),
                io.Float.Input("low_threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="canny: an edge continues through gradients above this (fraction of a "
                                       "black-to-white step). Lower keeps fainter edges."),
                io.Float.Input("high_threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="canny: an edge starts only at gradients above this. Higher keeps only the "
                                       "strongest edges."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="threshold: brightness above which a pixel is white; scribble: edge "
                                       "strength (of the strongest edge) above which a line is drawn."),
                io.Float.Input("blur", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="canny, soft_edge, scribble: smoothing (Gaussian sigma in pixels) before "
                                       "finding edges; more ignores fine texture."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="shuffle: which random shuffle; the same seed gives the same map."),
                io.Combo.Input("depth_model", options=[NO_MODEL, *depth_models],
                               default=depth_models[0] if depth_models else NO_MODEL,
                               tooltip="depth, normal: a transformers depth-estimation model folder in "
                                       f"models/{DEPTH_FOLDER} (e.g. Intel/dpt-hybrid-midas or "
                                       "Depth-Anything-V2-Small-hf)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Only for ControlNets that work in latent space (some SD3/Flux ones); "
                                     "SD1.x, SD2.x and SDXL ControlNets need none."),
            ],
            outputs=[
                io.Conditioning.Output("guided_positive", display_name="positive",
                                       tooltip="The positive conditioning, now guided by the map."),
                io.Conditioning.Output("guided_negative", display_name="negative",
                                       tooltip="The negative conditioning, now guided by the map."),
                io.Image.Output("control_map", display_name="control_map", tooltip="The map the ControlNet sees, at the control image's size."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # Missing models (a workflow from another machine) end as errors that say where to put them.
        return check_inputs(cls, inputs, later=("control_net", "depth_model"))

    @classmethod
    def execute(cls, positive, negative, control_net: str, image, preprocessor: str, strength: float,
                start_percent: float, end_percent: float, low_threshold: float, high_threshold: float,
                threshold: float, blur: float, seed: int, depth_model: str, vae=None) -> io.NodeOutput:
        if start_percent > end_percent:
            raise NodeError(f"`start_percent` ({start_percent}) is after `end_percent` ({end_percent}) — the "
                            "ControlNet would never act: make start_percent the smaller one")
        options = PreprocessOptions(low_threshold=low_threshold, high_threshold=high_threshold, threshold=threshold,
                                    blur=blur, seed=seed)
        control = make_control_map(image, preprocessor, options, depth_model)
        positive, negative = apply_control_net(positive, negative, control_net, control, strength,
                                               (start_percent, end_percent), vae)
        return io.NodeOutput(positive, negative, control, ui=ui.PreviewImage(control, cls=cls))


def make_control_map(image, preprocessor: str, options: PreprocessOptions, depth_model: str):
    estimator = None
    try:
        if preprocessor in NEEDS_DEPTH_MODEL:
            estimator = load_depth_model(depth_model, preprocessor)
        return control_map(image, preprocessor, options, depth_model=estimator)
    except FinetuneError as exc:
        raise node_error(exc, PREPROCESS_INPUTS) from None
    finally:
        if estimator is not None:
            estimator.close()


def load_depth_model(name: str, preprocessor: str) -> DepthEstimator:
    import comfy.model_management as mm

    if name == NO_MODEL:
        target = os.path.join(folder_paths.get_folder_paths(DEPTH_FOLDER)[0], "<model name>")
        raise NodeError(f"`depth_model`: the {preprocessor} preprocessor needs a depth-estimation model and none is "
                        f"installed — download one (e.g. Intel/dpt-hybrid-midas: config.json, "
                        f"preprocessor_config.json, model.safetensors) into {target}, refresh the page and pick it")
    return DepthEstimator(model_folder_path(DEPTH_FOLDER, name, "depth_model"), device=mm.get_torch_device())


def apply_control_net(positive, negative, control_net: str, control, strength: float,
                      percent_range: tuple[float, float], vae) -> tuple[list, list]:
    """ComfyUI's Apply ControlNet (Advanced) with our map, each new control wrapped to check the batch sizes."""
    import nodes as comfy_nodes

    if strength == 0:
        return positive, negative
    applied = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, load_control_net(control_net), control, strength, *percent_range, vae=vae)
    checked: dict[int, BatchCheckedControl] = {}
    out = []
    for conditioning in applied:
        items = []
        for embedding, extras in conditioning:
            net = extras["control"]
            checked.setdefault(id(net), BatchCheckedControl(net, control.shape[0], tuple(control.shape[1:3])))
            items.append([embedding, {**extras, "control": checked[id(net)]}])
        out.append(items)
    return out[0], out[1]


_LOADED: dict[str, Any] = {}


def load_control_net(name: str):
    """The ControlNet from models/controlnet; the last one loaded is kept for the next run."""
    import comfy.controlnet

    path = folder_paths.get_full_path("controlnet", name) if name else None
    if path is None:
        folders = " or ".join(folder_paths.get_folder_paths("controlnet"))
        raise NodeError(f"`control_net`: {name or 'no ControlNet'} is not in {folders} — put the ControlNet file "
                        "there (then refresh the page), or pick another")
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if _LOADED.get("key") != key:
        try:
            net = comfy.controlnet.load_controlnet(path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            net, reason = None, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        else:
            reason = "not a ControlNet or T2I-Adapter ComfyUI recognises"
        if net is None:
            raise NodeError(f"`control_net`: cannot load {name} ({reason}) — download it again, or pick another")
        _LOADED.update(key=key, net=net)
    return _LOADED["net"]


class BatchCheckedControl:
    """A control object of ComfyUI's (a ControlNet with its hint set) that, when sampling starts, checks that the
    control images are one for all latents or one per latent, and of the sampled image's shape; ComfyUI would
    otherwise repeat or drop some silently, or crop the map's edges away. Everything else is the wrapped object's."""

    ASPECT_TOLERANCE = 0.02

    def __init__(self, control, images: int, size: tuple[int, int]):
        self.control = control
        self.images = images
        self.height, self.width = size

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        latents = x_noisy.shape[0] // max(1, batched_number)
        if self.images not in (1, latents):
            raise NodeError(f"ControlNet Condition: `image` holds {self.images} control images but the latent batch "
                            f"has {latents} — connect 1 control image (used for every latent) or {latents}, or "
                            f"make the latent batch {self.images}")
        ratio = getattr(self.control, "compression_ratio", 8) or 8
        height, width = x_noisy.shape[-2] * ratio, x_noisy.shape[-1] * ratio
        if abs((self.width / self.height) / (width / height) - 1) > self.ASPECT_TOLERANCE:
            raise NodeError(f"ControlNet Condition: the control image is {self.width}x{self.height} but the image "
                            f"being sampled is {width}x{height}, another shape — the map would be cropped to fit; "
                            f"crop or resize the control image to {width}x{height} (e.g. with Upscale Image, crop "
                            f"center) or make the latent {self.width}x{self.height}")
        return self.control.get_control(x_noisy, t, cond, batched_number, transformer_options)

    def __getattr__(self, name: str):
        return getattr(self.control, name)


NODES = [ControlNetCondition]

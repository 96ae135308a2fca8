"""API graphs that draw pictures of the synthetic world with ComfyUI's stock nodes (Load Checkpoint, CLIP Text
Encode, Empty Latent Image, KSampler, VAE Decode, Save Image) around the pack's nodes, and the saved pictures read
back by prefix. Used by the picture tests and `make demo`."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from scripts import drawing_world as world
from tests.comfy.client import Result, image_paths

SAMPLER = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
"""How every picture is drawn: enough steps for the tiny base's pictures to settle, a moderate guidance."""
SUBFOLDER = "pictures"
SEED = 1000
"""Seed of every batch (a new seed: the base was trained on noise, not on these)."""
BATCH = 8
"""Pictures per case."""
RESULT_PREFIX = f"pictures_{uuid.uuid4().hex[:6]}_"
"""Starts the name of every run this test session trains (its results are removed after the session, and only
its own: another session on the same ComfyUI keeps its files)."""
QUIET = "[output]\ntensorboard = false\n[train]\nwarmup_steps = 0\n"
"""A Train node's `advanced` for the picture tests: no TensorBoard, no warm-up."""

Link = list  # [node id, output slot]


class Graph:
    """An API-format graph built node by node: `add` returns the node's id, `link(id, slot)` its output."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def link(node_id: str, slot: int = 0) -> Link:
        return [node_id, slot]

    def checkpoint(self, name: str) -> tuple[Link, Link, Link]:
        """Load Checkpoint's (model, clip, vae)."""
        loader = self.add("CheckpointLoaderSimple", ckpt_name=name)
        return self.link(loader, 0), self.link(loader, 1), self.link(loader, 2)

    def encode(self, clip: Link, prompt: str | Link) -> Link:
        return self.link(self.add("CLIPTextEncode", text=prompt, clip=clip))

    def draw(self, model: Link, clip: Link, vae: Link, prompt: str | Link, prefix: str, *, seed: int,
             batch: int = 8, conditioning: tuple[Link, Link] | None = None, side: int = world.SIZE) -> str:
        """`batch` pictures of `prompt` (or of the given (positive, negative) `conditioning`) saved as
        `pictures/<prefix>_*.png`. Returns the Save Image node's id."""
        positive, negative = conditioning or (self.encode(clip, prompt), self.encode(clip, ""))
        latent = self.add("EmptyLatentImage", width=side, height=side, batch_size=batch)
        samples = self.add("KSampler", model=model, seed=seed, positive=positive, negative=negative,
                           latent_image=self.link(latent), **SAMPLER)
        image = self.add("VAEDecode", samples=self.link(samples), vae=vae)
        return self.add("SaveImage", images=self.link(image), filename_prefix=f"{SUBFOLDER}/{prefix}")


def pictures_by_prefix(result: Result, output_dir: Path) -> dict[str, list[Path]]:
    """The saved pictures of a run, grouped by the prefix given to `Graph.draw`, each group in batch order."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in image_paths(result, output_dir):
        if path.parent.name == SUBFOLDER:
            found[re.sub(r"_\d+_$", "", path.stem)].append(path)
    return {prefix: sorted(paths) for prefix, paths in found.items()}


def subject_folder(input_dir: Path, name: str, caption: str, count: int = 4) -> Path:
    """`count` pictures of the world's subject with `caption` beside each, in a server's input folder."""
    folder = Path(input_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        world.SUBJECT.render().save(folder / f"subject_{index}.png")
        (folder / f"subject_{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def run_name(kind: str) -> str:
    return f"{RESULT_PREFIX}{kind}_{uuid.uuid4().hex[:6]}"


def draw_and_read(comfy, comfy_server, graph: Graph, timeout: float = 900) -> dict[str, list[Path]]:
    """Run the graph on the server; its saved pictures by prefix."""
    result = comfy.run(graph.nodes, timeout=timeout)
    assert result.status == "success", result.error
    return pictures_by_prefix(result, comfy_server.output_dir)


def report(case: str, **numbers: Any) -> None:
    """Print a case's numbers (pytest shows them with -s, and in the log of a failing test)."""
    print(f"\n[pictures] {case}: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                               for k, v in numbers.items()))


def dataset(graph: Graph, folder: str, **options: Any) -> Link:
    """Load Training Images on a folder of the server's input folder, at the world's size, no buckets."""
    return graph.link(graph.add("FinetuneLoadTrainingImages", folder="(none)", path=folder, repeats=1,
                                resolution=world.SIZE, crop="center", flip=False, bucketing=False, **options))

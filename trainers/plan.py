"""Everything that can be checked before a model is loaded: config, data, steps, buckets, a memory estimate.

`make_plan` is what `--dry-run` prints and the first thing `train` does, so bad input fails in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import METHODS_WITHOUT_IMAGES, Config, fill_template, learning_rate_origin
from .data.dataset import DatasetScan, TrainingDataset, scan_dataset
from .errors import ModelError
from .memory import GIB, MemoryPlan, free_gpu_memory, plan_for_config, shape_of_file
from .runfolder import read_safetensors_header


@dataclass
class Plan:
    cfg: Config
    """The config with data-dependent defaults filled in."""
    scan: DatasetScan
    dataset: TrainingDataset | None
    """None for a method that makes its own data (DDPO)."""
    validation: TrainingDataset | None
    run_dir: Path
    model_bytes: int | None
    learning_rate_origin: str = "set"
    """"set" (by the user), or whose default the learning rate is ("prodigy's default", "lora's default")."""
    memory: MemoryPlan | None = None
    """The memory levers picked for this run and the estimate behind them (None: model shape unknown)."""

    def buckets(self) -> dict[str, int]:
        if self.dataset is None:
            return {}
        counts = Counter(self.dataset.bucket_of(i) for i in range(len(self.dataset)))
        return {f"{w}x{h}": n for (w, h), n in sorted(counts.items())}

    def estimated_memory_gb(self) -> float | None:
        """Peak device memory of a training step with the planned levers (`memory.estimate_bytes`); None for a model
        whose shape is not known before it loads (a hub id, a diffusers folder)."""
        if self.memory is None:
            return None
        return round(self.memory.estimate_bytes / GIB, 2)

    def summary(self) -> dict[str, Any]:
        t = self.cfg.train
        info = {
            "method": t.method + (" + DreamBooth" if self.cfg.dreambooth.enabled else ""),
            "base_model": self.cfg.model.base,
            "images": self.scan.num_images,
            "samples_per_epoch": len(self.dataset) if self.dataset is not None else 0,
            "skipped": [[str(p), why] for p, why in self.scan.skipped],
            "validation_images": len(self.validation) if self.validation is not None else 0,
            "buckets": self.buckets(),
            "steps": t.steps,
            "batch_size": t.batch_size,
            "optimizer": t.optimizer,
            "learning_rate": t.learning_rate,
            "learning_rate_from": self.learning_rate_origin,
            "estimated_memory_gb": self.estimated_memory_gb(),
            "memory_plan": self.memory.summary() if self.memory is not None else None,
            "run_dir": str(self.run_dir),
        }
        info["text"] = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in info.items())
        return info


def make_plan(cfg: Config) -> Plan:
    cfg.validate()
    if cfg.dreambooth.enabled and not cfg.data.default_caption:
        instance = fill_template(cfg.dreambooth.instance_prompt, cfg.data.trigger_word, cfg.data.class_noun)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, default_caption=instance))
    from .optimizers import check_available

    check_available(cfg.train.optimizer)
    model_bytes = _model_size(cfg.model.base)
    origin = learning_rate_origin(cfg)
    scan = DatasetScan([]) if cfg.train.method in METHODS_WITHOUT_IMAGES else scan_dataset(cfg.data, seed=cfg.train.seed)
    cfg = cfg.resolve_defaults(scan.num_images)
    cfg, memory = _plan_memory(cfg)
    dataset = TrainingDataset(scan.items, cfg.data, seed=cfg.train.seed) if scan.items else None
    validation = None
    if scan.validation_items:
        eval_data = dataclasses.replace(cfg.data, crop="center", flip=False, caption_dropout=0.0, shuffle_tags=False)
        validation = TrainingDataset([dataclasses.replace(i, repeats=1) for i in scan.validation_items], eval_data,
                                     seed=cfg.train.seed)
    run_dir = Path(cfg.output.dir) / cfg.output.name
    return Plan(cfg, scan, dataset, validation, run_dir, model_bytes, origin, memory)


def _plan_memory(cfg: Config) -> tuple[Config, MemoryPlan | None]:
    """Decide the memory levers left at auto: before any weights load, so a run that cannot fit fails at once."""
    shape = shape_of_file(Path(cfg.model.base).expanduser())
    budget, source = None, "none"
    if cfg.train.memory_budget_gb <= 0 and cfg.train.memory == "auto" and shape is not None:
        budget = free_gpu_memory()
        source = "free GPU memory" if budget is not None else "none"
    return plan_for_config(cfg, shape, budget=budget, budget_source=source)


def _model_size(base: str) -> int | None:
    """Bytes of a local model (a safetensors header or a folder's files); fails early on a missing local file."""
    path = Path(base).expanduser()
    looks_local = path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") or path.is_absolute() \
        or base.startswith((".", "~"))
    if not path.exists():
        if looks_local:
            raise ModelError("the base model file does not exist",
                             "check model.base (a .safetensors checkpoint, a diffusers folder or a hub id)",
                             where=str(path))
        return None  # a hub id: sized when downloaded
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*.safetensors")) or None
    if path.suffix.lower() == ".safetensors":
        try:
            header = read_safetensors_header(path)
            # a header is a JSON object of {"data_offsets": [begin, end], ...} entries
            return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0])
                       for k, v in header.items() if k != "__metadata__")
        except (OSError, ValueError, MemoryError, AttributeError, KeyError, IndexError, TypeError):
            raise ModelError("the file is not a readable .safetensors file (truncated or corrupt?)",
                             "download it again or pick another checkpoint", where=str(path)) from None
    return path.stat().st_size

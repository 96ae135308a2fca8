"""`python -m trainers train CONFIG [--resume] [--dry-run] [--events] [--set section.key=value ...]`

Also runs under `accelerate launch -m trainers train CONFIG` for several GPUs or machines.
Exit status: 0 done or stopped (a checkpoint was kept), 2 a problem with the input (one clear message), 1 a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import Config
from .errors import FinetuneError


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise FinetuneError(f"--set {text!r} has no '='", "write --set section.key=value, e.g. --set train.steps=500")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str, overrides: list[str]) -> Config:
    cfg = Config.load(path)
    if not overrides:
        return cfg
    data = cfg.to_dict()
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return Config.from_dict(data, source=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description="Fine-tune Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train from a TOML or JSON config")
    run.add_argument("config", help="path of the config (.toml or .json)")
    run.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    run.add_argument("--dry-run", action="store_true", help="check config and data, print the plan, train nothing")
    run.add_argument("--events", action="store_true", help="print one JSON event per line (for a parent process)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from .events import StopSignal, events_to_parent, print_human, print_json_lines
    from .runfolder import ErrorEvent, PlanEvent

    started = time.time()
    printer = print_json_lines if args.events else print_human
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            from .plan import make_plan

            printer(PlanEvent(make_plan(cfg).summary()).as_dict())
            return 0
        from .loop import train

        # A parent process (--events) removes an old STOP before it starts the trainer, so every STOP there is a
        # Cancel of this run, however early it came; from a shell, one older than this process is stale.
        stop = StopSignal(Path(cfg.output.dir) / cfg.output.name, since=0.0 if args.events else started)
        stop.install_signal_handlers()
        if args.events:  # driven by a parent process: stop when it is gone
            printer = events_to_parent(stop)
            stop.stop_when_orphaned()
        train(cfg, resume=args.resume, callbacks=[printer], stop=stop)
        return 0
    except FinetuneError as exc:
        if args.events and not getattr(exc, "reported", False):
            print_json_lines(ErrorEvent(str(exc), exc.where).as_dict())
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Run under `accelerate launch` by test_resume: trains the configs named on the command line, one after another,
in every process, and writes each process's own per-step losses (only the main process writes events).

    rank_losses.py OUT_DIR NAME:CONFIG[:stop=K|:resume] ...

writes OUT_DIR/NAME_<rank>.json = {"rank", "world", "status", "losses"}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import PartialState  # noqa: E402

from trainers.config import Config  # noqa: E402
from trainers.events import StopSignal  # noqa: E402
from trainers.loop import train  # noqa: E402
from trainers.methods.base import Method  # noqa: E402

LOSSES: list[float] = []
_compute_loss = Method.compute_loss


def recording_compute_loss(self, batch, generator):
    loss, logs = _compute_loss(self, batch, generator)
    LOSSES.append(float(loss.detach()))
    return loss, logs


def run(out: Path, job: str) -> None:
    name, config, *option = job.split(":")
    cfg = Config.load(config)
    stop = StopSignal(Path(cfg.output.dir) / cfg.output.name)
    stop_at = int(option[0].split("=")[1]) if option and option[0].startswith("stop=") else 0

    def stop_there(event):
        if event["event"] == "progress" and event["step"] == stop_at:
            stop.request()  # the main process asks; the loop agrees on it between all processes

    LOSSES.clear()
    result = train(cfg, resume=option == ["resume"], callbacks=[stop_there], stop=stop)
    state = PartialState()
    (out / f"{name}_{state.process_index}.json").write_text(json.dumps(
        {"rank": state.process_index, "world": state.num_processes, "status": result.status, "losses": LOSSES}))


if __name__ == "__main__":
    Method.compute_loss = recording_compute_loss
    for job in sys.argv[2:]:
        run(Path(sys.argv[1]), job)

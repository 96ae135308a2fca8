"""Errors a user can act on. Everything the trainer rejects is raised as one of these, before long work starts."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input, stated with what to change."""

    def __init__(self, problem: str, fix: str = "", *, where: str = ""):
        self.problem = problem
        self.fix = fix
        self.where = where
        text = f"{where}: {problem}" if where else problem
        if fix:
            text += f" — {fix}"
        super().__init__(text)


class ConfigError(FinetuneError):
    """A config field has a value the trainer cannot use. `where` names the field, e.g. `lora.rank`."""


class DataError(FinetuneError):
    """The training data cannot be used. `where` names the file or folder."""


class ModelError(FinetuneError):
    """The base model cannot be loaded or is of an unknown architecture. `where` names the file."""


class NonFiniteLoss(FinetuneError):
    """The loss became NaN or infinite."""


class DiskFullError(FinetuneError):
    """The disk (or the user's quota) is full while writing into a folder."""

    def __init__(self, folder):
        super().__init__("disk full", f"free some space on the disk of {folder}, then run again (a resumed run "
                                      "continues from its last checkpoint)", where=str(folder))


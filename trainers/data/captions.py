"""Captions: where they come from (sidecar files, the manifest, a default) and what happens to them each step
(trigger word first, tag shuffling, caption dropout)."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..config import DataConfig, fill_template
from ..errors import DataError

FALLBACK_CAPTION_EXTENSION = ".caption"


def read_caption_file(path: Path) -> str:
    """The caption in `path` (UTF-8, BOM allowed) with its whitespace collapsed to single spaces."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"the caption file is not UTF-8 text (bad byte at position {exc.start})",
                        "re-save it as UTF-8 in your text editor", where=str(path)) from None
    return " ".join(text.split())


def sidecar_caption(image_path: Path, caption_extension: str = ".txt") -> str | None:
    """The caption from `<stem><caption_extension>` (or `<stem>.caption`) beside the image; None if there is none.

    An empty caption file counts as none, so the default caption applies to it.
    """
    extension = "." + caption_extension.strip().lstrip(".")
    for candidate in dict.fromkeys(e for e in (extension, FALLBACK_CAPTION_EXTENSION) if e != "."):
        path = image_path.with_suffix(candidate)
        if path.is_file():
            return read_caption_file(path) or None
    return None


def default_caption(cfg: DataConfig) -> str:
    return fill_template(cfg.default_caption, cfg.trigger_word, cfg.class_noun)


@dataclass(frozen=True)
class CaptionRules:
    """What happens to a caption each time it is used."""

    trigger_word: str = ""
    class_noun: str = ""
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "CaptionRules":
        return cls(trigger_word=cfg.trigger_word.strip(), class_noun=cfg.class_noun.strip(),
                   dropout=cfg.caption_dropout, shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens)


def apply_caption_rules(caption: str, rules: CaptionRules, rng: random.Random) -> str:
    """Dropout (→ "" for unconditional training), then the trigger word first, then tag shuffling."""
    if rules.dropout > 0 and rng.random() < rules.dropout:
        return ""
    caption = with_trigger(caption, rules.trigger_word, rules.class_noun)
    if rules.shuffle_tags:
        caption = shuffle_tags(caption, rules.keep_tokens, rng, pinned_word=rules.trigger_word)
    return caption


def with_trigger(caption: str, trigger_word: str, class_noun: str = "") -> str:
    """Put `trigger_word` (and `class_noun` if the caption lacks it) in front, unless the caption already has it."""
    if not trigger_word or contains_word(caption, trigger_word):
        return caption
    prefix = trigger_word
    if class_noun and not contains_word(caption, class_noun):
        prefix = f"{trigger_word} {class_noun}"
    return f"{prefix}, {caption}" if caption else prefix


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random, *, pinned_word: str = "") -> str:
    """Shuffle the comma-separated tags after the first `keep_tokens`; a tag holding `pinned_word` never moves."""
    tags = split_tags(caption)
    movable = [i for i in range(keep_tokens, len(tags)) if not (pinned_word and contains_word(tags[i], pinned_word))]
    shuffled = [tags[i] for i in movable]
    rng.shuffle(shuffled)
    for position, tag in zip(movable, shuffled):
        tags[position] = tag
    return ", ".join(tags)


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def contains_word(text: str, word: str) -> bool:
    """`word` appears in `text` as a whole word (case-insensitive): "dog" is in "a dog," but not in "hotdogs"."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs, most frequent first (kohya's `ss_tag_frequency` per folder)."""
    return dict(Counter(tag for caption in captions for tag in split_tags(caption)).most_common())

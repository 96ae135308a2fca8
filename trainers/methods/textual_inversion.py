"""Textual inversion: new token embeddings for the trigger word, in every text encoder; everything else frozen.

The trigger word becomes `num_vectors` new tokens (`sks`, `sks_1`, ...: the names diffusers' pipelines expand a
multi-vector embedding from), whose vectors are the only trained parameters. They live in a small module in front of
each encoder's token embedding, so the original embedding matrix is never touched and the optimizer holds nothing
else. Exported as an embedding file ComfyUI loads with `embedding:NAME`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import AddedToken, CLIPTextModel

from ..data.dataset import TrainingDataset
from ..errors import ConfigError
from ..export.embedding import embedding_metadata, embedding_state, save_embedding
from .base import MappedDataset, Method, RunSummary


class PlaceholderEmbedding(torch.nn.Module):
    """A token embedding whose rows for `new_ids` come from the trainable `vectors`."""

    def __init__(self, original: torch.nn.Embedding, new_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.original = original
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long, device=original.weight.device),
                             persistent=False)
        self.vectors = torch.nn.Parameter(init.detach().float().repeat(len(new_ids), 1).to(original.weight.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        match = ids.unsqueeze(-1) == self.new_ids
        is_new = match.any(-1)
        known = self.original(torch.where(is_new, torch.zeros_like(ids), ids))
        # Always through the vectors (zero weight where unused), so a batch without the word still reaches them.
        new = self.vectors[match.long().argmax(-1)].to(known.dtype)
        return torch.where(is_new.unsqueeze(-1), new, known)


def placeholder_tokens(trigger: str, num_vectors: int) -> list[str]:
    return [trigger] + [f"{trigger}_{n}" for n in range(1, num_vectors)]


def expand_trigger(text: str, trigger: str, num_vectors: int) -> str:
    """Every whole-word `trigger` in `text` becomes all the placeholder tokens (case-insensitive, as CLIP's
    tokenizer lowercases)."""
    if num_vectors == 1:
        return text
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)
    return pattern.sub(" ".join(placeholder_tokens(trigger.lower(), num_vectors)), text)


def add_placeholder_embedding(text_encoder: torch.nn.Module, tokenizer, tokens: list[str],
                              initializer: str) -> PlaceholderEmbedding:
    """Add `tokens` to `tokenizer` and put a PlaceholderEmbedding, started from `initializer`'s mean embedding,
    in front of `text_encoder`'s token embedding."""
    known = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, single_word=True) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if any(i < known for i in ids) or tokenizer.tokenize(tokens[0]) != [tokens[0]]:
        raise ConfigError(f"{tokens[0]!r} is already a token of the text encoder's vocabulary, so it cannot be "
                          "given a new embedding", "use a made-up word, e.g. 'sks' or 'my-cat'",
                          where="data.trigger_word")
    original = text_encoder.get_input_embeddings()
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids or max(init_ids) >= original.num_embeddings:
        raise ConfigError(f"the initializer {initializer!r} has no usable tokens",
                          "use a word that describes the concept, e.g. 'dog' or 'painting'",
                          where="textual_inversion.initializer")
    init = original.weight[init_ids].float().mean(dim=0, keepdim=True)
    patch = PlaceholderEmbedding(original, ids, init)
    text_encoder.set_input_embeddings(patch)
    _find_end_of_text_by_id(text_encoder, tokenizer)
    return patch


def _find_end_of_text_by_id(text_encoder: torch.nn.Module, tokenizer) -> None:
    # Configs from before transformers' fix say eos_token_id 2, which makes CLIP pool at the *largest* token id: once
    # tokens are added that is the new word, not the end of the text. Matching the real end-of-text id gives the
    # same result as before for every prompt without new tokens.
    for module in text_encoder.modules():
        if isinstance(module, CLIPTextModel) and module.eos_token_id == 2:
            module.eos_token_id = tokenizer.eos_token_id


class TextualInversionMethod(Method):
    name = "textual_inversion"
    # Gradients flow through the frozen encoders to the new vectors: the prompt embeddings cannot be cached.
    trains_text_encoder = True

    def setup(self) -> None:
        self.freeze_all()
        ti, data = self.cfg.textual_inversion, self.cfg.data
        self.trigger = data.trigger_word.strip()
        self.num_vectors = ti.num_vectors
        initializer = ti.initializer.strip() or data.class_noun.strip() or "*"
        tokens = placeholder_tokens(self.trigger, self.num_vectors)
        self.patches = [add_placeholder_embedding(te, tok, tokens, initializer)
                        for te, tok in zip(self.base.text_encoders, self.base.tokenizers, strict=True)]

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [patch.vectors for patch in self.patches], "lr": self.cfg.train.learning_rate}]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {f"text_encoder_{i}": te for i, te in enumerate(self.base.text_encoders)}

    def prepare_dataset(self, dataset: TrainingDataset) -> MappedDataset:
        """Captions name the trigger word once; the encoders must see all of its tokens."""
        return MappedDataset(dataset, lambda example: {
            **example, "caption": expand_trigger(example["caption"], self.trigger, self.num_vectors)})

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"text_encoder_{i}.vectors": patch.vectors.detach().clone() for i, patch in enumerate(self.patches)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, patch in enumerate(self.patches):
            saved = state.get(f"text_encoder_{i}.vectors")
            if saved is None or saved.shape != patch.vectors.shape:
                raise ConfigError("the checkpoint's embedding does not match this run's (another num_vectors or "
                                  "model?)", "resume with the settings the checkpoint was made with, or start a new "
                                  "run", where="textual_inversion.num_vectors")
            with torch.no_grad():
                patch.vectors.copy_(saved)

    def export(self, path: Path, run: RunSummary, *, overwrite: bool) -> Path:
        state = embedding_state(self.base.family.name, [patch.vectors for patch in self.patches])
        metadata = embedding_metadata(self.cfg, family=self.base.family,
                                      prediction_type=self.base.prediction_type, steps_done=run.steps_done,
                                      finished_at=run.finished_at)
        return save_embedding(path, state, metadata, overwrite=overwrite)

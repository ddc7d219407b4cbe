"""Placeholder tokens whose vectors are computed every step — the one concept-injection mechanism.

A concept is a placeholder word (`<concept>`) added to a tokenizer, with `n` vectors: `<concept>`, `<concept>_1`,
... `<concept>_{n-1}` (diffusers' own multi-vector naming, so its pipelines expand the prompt the same way).
Where its vectors come from is the method's business: a free parameter (Textual Inversion), `w @ basis` (BaTex),
an image encoder's output (SingleInsert). Every such source is an `nn.Module` whose `forward()` returns `[n, d]`
(the same vectors for every prompt of the batch) or `[B, n, d]` (one set per prompt row, e.g. per training image).

`ConceptEmbedding` replaces the text encoder's input-embedding module (through transformers' public
`get_input_embeddings` / `set_input_embeddings`, never by patching transformers). Its forward looks every id up
in the frozen original table and then swaps in the concept vectors wherever a placeholder id appears — at any
position, in any row of the batch, for any number of concepts — with one gather and one `torch.where`, so the
gradient reaches the vector source and nothing else. The original vocabulary is never resized nor touched.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PersonalizeError, PlaceholderTaken


class FixedVectors(nn.Module):
    """Vectors loaded from a file: what `generate` injects. Not trainable."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("value", vectors.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.value


class FreeVectors(nn.Module):
    """Textual Inversion's parametrisation: the vectors themselves are the parameters."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.value


def token_names(token: str, num_vectors: int) -> list[str]:
    """`<c>`, `<c>_1`, ... — the names diffusers' `load_textual_inversion` gives a multi-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """Replace each `<c>` of a prompt by `<c> <c>_1 ...` so that every vector gets a position."""
    return prompt.replace(token, " ".join(token_names(token, num_vectors))) if num_vectors > 1 else prompt


def renamed(token: str) -> str:
    """A suggestion for a placeholder that is taken: `<c>` -> `<my-c>`."""
    return f"<my-{token.strip('<>')}>"


def add_placeholder_tokens(tokenizer, token: str, num_vectors: int) -> list[int]:
    """Add the placeholder's names to a tokenizer and return their ids; refuse words the tokenizer already knows."""
    names = token_names(token, num_vectors)
    for name in names:
        if name in tokenizer.get_vocab():
            raise PlaceholderTaken(
                f"the placeholder {name!r} is already a word of the tokenizer; pick a new one, e.g. --token '{renamed(token)}'",
                token,
            )
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    # A placeholder must come out as exactly one id, else the prompt would inject nothing.
    for name, token_id in zip(names, ids):
        if tokenizer(name, add_special_tokens=False).input_ids != [token_id]:
            raise PersonalizeError(f"the tokenizer splits the placeholder {name!r}; use a token without spaces")
    return ids


class ConceptEmbedding(nn.Module):
    """Drop-in replacement of a text encoder's token-embedding module that injects concept vectors.

    `base` is the original `nn.Embedding` (kept frozen). `concepts` maps a placeholder's first id to the module
    producing its vectors; its `n` ids must be consecutive (they are, as `add_placeholder_tokens` adds them together).
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.concepts = nn.ModuleDict()
        self._first_ids: dict[str, int] = {}
        self._lookup_key: tuple | None = None  # what the cached id -> slot table was built for
        self._lookup: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # some callers (e.g. resize checks) peek at .weight
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def add(self, name: str, first_id: int, source: nn.Module) -> None:
        """Register a concept: its vectors replace ids first_id ... first_id + n - 1."""
        self.concepts[name] = source
        self._first_ids[name] = first_id

    def remove(self, name: str) -> None:
        del self.concepts[name]
        del self._first_ids[name]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        # Placeholder ids lie past the original table: look them up as id 0, overwritten below.
        embeds = self.base(torch.where(input_ids < vocab, input_ids, torch.zeros_like(input_ids)))
        if not self.concepts:
            return embeds
        batch = input_ids.shape[0]
        table = []
        for name, source in self.concepts.items():
            vectors = source()  # [n, d] shared by every row, or [B, n, d] per row (an image encoder's output)
            if vectors.dim() == 2:
                vectors = vectors.unsqueeze(0).expand(batch, -1, -1)
            elif vectors.shape[0] != batch:
                raise ValueError(f"concept {name!r} gives vectors for {vectors.shape[0]} rows, the prompt batch has {batch}")
            table.append(vectors.to(embeds.dtype))
        key = (tuple((self._first_ids[name], t.shape[1]) for name, t in zip(self.concepts, table)), input_ids.device)
        lookup = self._slot_lookup(key)
        table = torch.cat(table, dim=1)  # [B, K, d]: every concept's vectors, per row
        slots = lookup[input_ids.clamp(max=lookup.numel() - 1)]
        slots = torch.where(input_ids < lookup.numel(), slots, torch.full_like(slots, -1))
        injected = torch.gather(table, 1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, table.shape[-1]))
        return torch.where((slots >= 0).unsqueeze(-1), injected, embeds)


    def _slot_lookup(self, key: tuple) -> torch.Tensor:
        """id -> slot in the concatenated vector table (-1: not a placeholder), built only when the concepts (their
        first ids and vector counts) or the device change: a host-to-device copy per step would be a GPU sync."""
        if key != self._lookup_key:
            slot_of_id, offset = {}, 0
            for first, n in key[0]:
                for i in range(n):
                    slot_of_id[first + i] = offset + i
                offset += n
            lookup = torch.full((max(slot_of_id) + 1,), -1, dtype=torch.long)
            lookup[torch.tensor(list(slot_of_id))] = torch.tensor(list(slot_of_id.values()))
            self._lookup, self._lookup_key = lookup.to(key[1]), key
        return self._lookup


def concept_embedding(text_encoder) -> ConceptEmbedding:
    """The text encoder's ConceptEmbedding, installing it on first use."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, ConceptEmbedding):
        return current
    current.requires_grad_(False)
    wrapper = ConceptEmbedding(current)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


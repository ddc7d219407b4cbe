"""BaTex (papers/batex.md): learn the concept as a combination of M vocabulary vectors near the init word.

    Algorithm 1   dist_V = (F(u, v_1), …, F(u, v_|V|))                      (eq. 6)
                  V_M = the M nearest vectors, M grown until rank(V_M) ≥ d1
    eq. 3-4       w⁰ = one-hot on the init word, so v⁰ = V_M w⁰ = u exactly
    eq. 5, 7      v = V_M w;  w ← AdamW step on L_rec (only w is trained, with weight decay γ)
    Theorem 2     one SGD step moves v by V_M V_Mᵀ times Textual Inversion's step (tests/test_batex.py checks it)

Where this departs from, or fixes, the official code:
- cosine distance is taken along the embedding dimension (the official code normalises along the vocabulary
  axis and silently ends up with token ids 0..767);
- special tokens and every added placeholder are excluded from the vocabulary;
- the init word is always basis vector 0 (eq. 3 needs it in the basis; with the dot product another word can
  score higher than u itself), the other M−1 are its nearest neighbours;
- batch size > 1 works (the concept is injected per row by `concepts.ConceptEmbedding`);
- with several vectors (`--num-vectors`) each vector has its own basis, built around its own init piece.
Default M = 576 at d = 768 (the paper's choice, Table 4), scaled with d: M = round(0.75·d).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..export import save_basis_sidecar
from .textual_inversion import TextualInversion, TextualInversionConfig

log = logging.getLogger("personalize")
DISTANCES = ("dot", "cosine", "l2")


@dataclass
class BatexConfig(TextualInversionConfig):
    distance: str = field(default="dot", metadata={"help": "vector distance F of Algorithm 1", "choices": list(DISTANCES)})
    basis_size: int | None = field(default=None, metadata={"help": "M, the number of basis vectors (default 0.75·d: 576 for SD 1.x)"})
    subspace_dim: int | None = field(
        default=None, metadata={"help": "d1: grow M until rank(V_M) ≥ d1 (Algorithm 1); overrides --basis-size"}
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay γ on w (Algorithm 2)"})


class SubspaceVectors(nn.Module):
    """BaTex's parametrisation: v_i = Σ_m w_im · basis_im (eq. 7); only `w` is a parameter."""

    def __init__(self, basis: torch.Tensor, basis_ids: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis.detach().clone().float())  # [n, M, d], moves to the training device
        self.register_buffer("basis_ids", basis_ids.clone())  # [n, M]
        w = torch.zeros(basis_ids.shape, dtype=torch.float32)
        w[:, 0] = 1.0  # eq. 3: one-hot on the init word, which select_basis puts first
        self.w = nn.Parameter(w)

    def forward(self) -> torch.Tensor:
        return torch.einsum("nm,nmd->nd", self.w, self.basis)


def similarity(u: torch.Tensor, table: torch.Tensor, distance: str) -> torch.Tensor:
    """F(u, v_i) for every row of `table` [V, d], as a score where higher means closer (eq. 6)."""
    u, table = u.float(), table.float()
    if distance == "dot":
        return table @ u
    if distance == "cosine":  # normalised along the embedding dimension, per vocabulary vector
        return (table @ u) / (table.norm(dim=1) * u.norm()).clamp_min(1e-12)
    if distance == "l2":
        return -(table - u).norm(dim=1)
    raise ValueError(f"unknown distance {distance!r}; choose from {DISTANCES}")


def select_basis(
    table: torch.Tensor,
    init_id: int,
    excluded_ids: list[int],
    distance: str = "dot",
    basis_size: int | None = None,
    subspace_dim: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Algorithm 1: the ids of V_M (init word first, then nearest first) and rank(V_M).

    With `subspace_dim` d1, M is the smallest size whose rank reaches d1 (rank only grows with M, so a binary
    search finds it); otherwise M = `basis_size`.
    """
    scores = similarity(table[init_id], table, distance)
    scores[torch.tensor(excluded_ids, dtype=torch.long)] = float("-inf")
    scores[init_id] = float("inf")
    order = torch.argsort(scores, descending=True, stable=True)
    usable = int(torch.isfinite(scores).sum()) + 1  # + the init word (scored +inf)
    if subspace_dim is not None:
        d = table.shape[1]
        if not 1 <= subspace_dim <= d:
            raise ValueError(f"--subspace-dim must be between 1 and the embedding size {d}")
        low, high = subspace_dim, usable
        while low < high:
            mid = (low + high) // 2
            if torch.linalg.matrix_rank(table[order[:mid]].float()) >= subspace_dim:
                high = mid
            else:
                low = mid + 1
        basis_size = low
    basis_size = min(basis_size or round(0.75 * table.shape[1]), usable)
    ids = order[:basis_size]
    return ids, int(torch.linalg.matrix_rank(table[ids].float()))


class Batex(TextualInversion):
    name = "batex"
    config_class = BatexConfig
    default_steps = 500  # the paper's recommendation for M = 576 (Section 5)
    default_lr = 5e-4

    def make_source(self, init_ids: list[int], table: torch.Tensor, tokenizer) -> nn.Module:
        cfg = self.config
        excluded = sorted(set(tokenizer.all_special_ids) | {i for i in tokenizer.added_tokens_encoder.values() if i < len(table)})
        basis_of: dict[int, torch.Tensor] = {}
        for init_id in dict.fromkeys(init_ids):  # one basis per distinct init piece
            ids, rank = select_basis(table, init_id, excluded, cfg.distance, cfg.basis_size, cfg.subspace_dim)
            basis_of[init_id] = ids
            words = tokenizer.convert_ids_to_tokens(ids[:8].tolist())
            log.info("BaTex basis: M=%d, rank(V_M)=%d, distance=%s, first words: %s", len(ids), rank, cfg.distance, " ".join(words))
        ids_per_vector = [basis_of[i] for i in init_ids]
        bases = [table[ids] for ids in ids_per_vector]
        # Vectors whose init pieces differ can get different M under --subspace-dim: pad with zero rows (id −1),
        # whose weights get no gradient and so stay 0.
        size = max(len(ids) for ids in ids_per_vector)
        bases = [torch.cat([b, b.new_zeros(size - len(b), b.shape[1])]) for b in bases]
        ids_per_vector = [torch.cat([i, i.new_full((size - len(i),), -1)]) for i in ids_per_vector]
        return SubspaceVectors(torch.stack(bases), torch.stack(ids_per_vector))

    def save_concept(self, folder: Path, index: int, step: int, name: str) -> list[Path]:
        files = super().save_concept(folder, index, step, name)
        concept = self.concepts[index]
        return files + [save_basis_sidecar(folder, self.sources[index], concept.token, concept.init_word, self.config)]

"""BaTex's maths against its paper: Algorithm 1, eq. 3-4, Theorem 2, and the fixes to the official code."""

import pytest
import torch

from personalize.backbone import load_backbone
from personalize.methods import Batch, Batex, BatexConfig, TextualInversion, TextualInversionConfig
from personalize.methods.batex import SubspaceVectors, select_basis, similarity


def _sources(method):
    """The (first) concept's vector source per text encoder, whether `sources` is [encoder] or [concept][encoder]."""
    first = method.sources[0]
    return list(first) if isinstance(first, torch.nn.ModuleList) else list(method.sources)


def _one_loss(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    loss, _ = method.loss(Batch(latents, torch.zeros(2, dtype=torch.long), g), "main")
    return loss


@pytest.mark.parametrize("size", [{"basis_size": 20}, {"subspace_dim": 10}], ids=["basis-size-20", "subspace-dim-10"])
def test_theorem_2_one_sgd_step_is_a_rank_d1_transformation_of_the_ti_step(size):
    """Theorem 2: Δv₂ = B_V Δv₁ with B_V = V_M V_Mᵀ of rank d1 = r(V_M) < d, where V_M is rebuilt here from the
    vocabulary rows the method names (its basis ids), not taken from the method's own buffer."""
    lr = 0.1
    ti = TextualInversion(TextualInversionConfig(init_word="cat"), load_backbone("tiny"))
    bx = Batex(BatexConfig(init_word="cat", **size), load_backbone("tiny"))
    v0_ti, v0_bx = ti.vectors()[0], bx.vectors()[0]
    assert torch.equal(v0_ti, v0_bx)  # eq. 3-4: both start at u exactly
    for method in (ti, bx):
        opt = torch.optim.SGD(method.parameters(), lr=lr)
        _one_loss(method).backward()
        opt.step()
    delta_ti = (ti.vectors()[0] - v0_ti).double()  # [1, d], row form of Δv1
    delta_bx = (bx.vectors()[0] - v0_bx).double()
    assert delta_ti.abs().max() > 0

    backbone = load_backbone("tiny")
    table = backbone.text_encoders[0].get_input_embeddings().weight.detach().double()
    ids = _sources(bx)[0].basis_ids[0]
    cat = backbone.tokenizers[0]("cat", add_special_tokens=False).input_ids[0]
    assert ids[0].item() == cat and (ids >= 0).all() and len(set(ids.tolist())) == len(ids)
    v_m = table[ids].T  # V_M = [v_1, …, v_M] ∈ R^{d×M}
    d = v_m.shape[0]
    # eq. 7 against the vocabulary: the trained vector is V_M w with the ids the sidecar will name
    torch.testing.assert_close(bx.vectors()[0].double(), (v_m @ _sources(bx)[0].w.detach().double()[0])[None], rtol=1e-5, atol=1e-7)

    d1 = int(torch.linalg.matrix_rank(v_m))
    if "subspace_dim" in size:  # Algorithm 1: the smallest M whose rank reaches d1
        assert d1 == size["subspace_dim"] and int(torch.linalg.matrix_rank(v_m[:, :-1])) < d1
    else:
        assert v_m.shape[1] == size["basis_size"] and d1 == size["basis_size"]  # M generic vocabulary rows: rank M
    assert d1 < d  # a real subspace, not the whole embedding space
    b_v = v_m @ v_m.T  # B_V ∈ R^{d×d}
    assert int(torch.linalg.matrix_rank(b_v)) == d1  # r(B_V) = r(V_M) = d1
    projected = delta_ti @ b_v.T  # Δv2 = B_V Δv1, in row form
    torch.testing.assert_close(delta_bx, projected, rtol=1e-4, atol=1e-7)
    assert (delta_bx - delta_ti).abs().max() > 1e-3 * delta_ti.abs().max()  # not the identity: a rank-d1 map


def test_w_starts_one_hot_and_only_w_is_trained():
    bx = Batex(BatexConfig(init_word="dog"), load_backbone("tiny"))
    source = _sources(bx)[0]
    table = bx.backbone.text_encoders[0].get_input_embeddings().weight
    dog = bx.backbone.tokenizers[0]("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(source(), table[dog][None])
    assert source.w[0].nonzero().flatten().tolist() == [0]
    assert [p.shape for p in bx.param_groups()["main"]] == [source.w.shape]
    assert source.basis_ids[0, 0].item() == dog


def test_default_basis_size_scales_with_embedding_dim():
    bx = Batex(BatexConfig(init_word="dog"), load_backbone("tiny"))  # d = 32
    assert _sources(bx)[0].basis.shape[1] == round(0.75 * 32)  # 576 at d = 768


def test_cosine_is_along_the_embedding_dimension():
    torch.manual_seed(0)
    table = torch.randn(1000, 16)
    u = table[500]
    expected = torch.nn.functional.cosine_similarity(table, u[None], dim=1)
    torch.testing.assert_close(similarity(u, table, "cosine"), expected)
    ids, _ = select_basis(table, 500, [], "cosine", basis_size=10)
    assert ids.tolist() == torch.argsort(expected, descending=True)[:10].tolist()
    assert ids.tolist() != list(range(10))  # the official code's symptom: ids 0..M-1


def test_l2_and_dot_orderings():
    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [5.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert select_basis(table, 0, [], "l2", basis_size=3)[0].tolist() == [0, 1, 4]
    # dot prefers long vectors; the init word stays first anyway (eq. 3 needs it in the basis)
    assert select_basis(table, 0, [], "dot", basis_size=3)[0].tolist() == [0, 2, 1]


def test_excluded_ids_never_enter_the_basis():
    torch.manual_seed(0)
    table = torch.randn(200, 8)
    excluded = [i for i in torch.argsort(table @ table[3], descending=True)[:6].tolist() if i != 3][:5]  # the 5 nearest
    ids, _ = select_basis(table, 3, excluded, "dot", basis_size=50)
    assert not set(ids.tolist()) & set(excluded)


def test_special_tokens_and_placeholders_are_excluded_on_a_real_tokenizer():
    backbone = load_backbone("tiny")
    bx = Batex(BatexConfig(init_word="cat", basis_size=2000), backbone)
    tok = backbone.tokenizers[0]
    banned = set(tok.all_special_ids) | set(tok.added_tokens_encoder.values())
    assert not set(_sources(bx)[0].basis_ids.flatten().tolist()) & banned


def test_algorithm_1_grows_m_until_rank_reaches_d1():
    torch.manual_seed(0)
    base = torch.randn(6, 12)
    # 40 vectors, but the nearest 20 only span 3 dimensions: M must grow past them to reach rank 5
    near = torch.randn(20, 3) @ base[:3] * 0.1 + base[0] * 3
    table = torch.cat([base[:1] * 3, near, torch.randn(19, 12) * 0.01])
    ids, rank = select_basis(table, 0, [], "l2", subspace_dim=5)
    assert rank >= 5
    assert torch.linalg.matrix_rank(table[ids[:-1]]) < 5  # minimal: one fewer is not enough


def test_subspace_vectors_pad_rows_get_no_gradient():
    basis = torch.randn(1, 4, 8)
    basis[0, 3] = 0
    source = SubspaceVectors(basis, torch.tensor([[5, 6, 7, -1]]))
    source().sum().backward()
    assert source.w.grad[0, 3] == 0


def test_batch_size_greater_than_one_and_placeholder_anywhere():
    bx = Batex(BatexConfig(init_word="cat", num_vectors=2), load_backbone("tiny"))
    loss = _one_loss(bx)
    loss.backward()
    assert torch.isfinite(loss) and _sources(bx)[0].w.grad.abs().sum() > 0

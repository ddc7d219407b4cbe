"""Dis²Booth's Algorithm 1: which reading of the optimiser state makes the paper's λ matter, the update count, and
the feature queues (eq. 7 and 11 against a known queue; when the queues change)."""

import copy
import math

import pytest
import torch

from personalize.backbone import load_backbone
from personalize.methods import Batch, Dis2Booth, Dis2BoothConfig
from personalize.methods.dis2booth import FeatureQueue


def _method(**overrides):
    torch.manual_seed(0)  # peft's gaussian LoRA init draws from the global generator
    backbone = load_backbone("tiny")
    backbone.freeze()
    config = Dis2BoothConfig(class_word="cat", rank=4, warmup_steps=0, **overrides)
    method = Dis2Booth(config, backbone)
    method.begin_step(0)  # the split
    return method


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(2, 4, 4, 4, generator=g), torch.zeros(2, dtype=torch.long), g)


def _train_only_anchor(method):
    for k, p in method.lora_params.items():
        p.requires_grad_(k.startswith("anchor__"))


def _contextual_step(method, optimizer, weight):
    """One Algorithm-1 step 1 (Anchor LoRA <- descend λ·ℓ_con) with λ = weight; returns the anchor weights' change."""
    method.config.contextual_loss_weight = weight
    before = torch.cat([p.detach().flatten().clone() for p in method._group_params("anchor")])
    loss, _ = method.loss(_batch(7), "contextual")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in method._group_params("anchor")]) - before


def test_shared_adam_state_makes_the_contextual_weight_matter():
    """Shared state (the implemented reading): the λ-driven part of a feature step scales with λ. A fresh optimiser of
    the feature step's own would move the weights by ~lr whether λ is 1e-5 or 1e-2: λ would mean nothing."""
    method = _method()
    _train_only_anchor(method)
    params = method._group_params("anchor")
    shared = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for seed in range(3):  # ℓ_LDM steps: the state the feature step shares
        loss, _ = method.loss(_batch(seed), "ldm")
        loss.backward()
        shared.step()
        shared.zero_grad(set_to_none=True)
    method.loss(_batch(99), "contextual")
    method.begin_step(1)  # the iteration's end: its anchor features join the queue
    start = ([p.detach().clone() for p in params], copy.deepcopy(shared.state_dict()), copy.deepcopy(method.queues))

    def restored_step(weight, optimizer):
        with torch.no_grad():
            for p, saved in zip(params, start[0]):
                p.copy_(saved)
        method.queues = copy.deepcopy(start[2])
        return _contextual_step(method, optimizer, weight)

    def shared_optimizer():
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        optimizer.load_state_dict(copy.deepcopy(start[1]))
        return optimizer

    lam = 1e-6  # small enough that λ·∇ℓ_con does not yet dominate the shared second moment: the linear regime
    zero, once, twice = (restored_step(w, shared_optimizer()) for w in (0.0, lam, 2 * lam))
    effect, double = (once - zero).norm(), (twice - zero).norm()
    assert effect > 0
    assert double / effect == pytest.approx(2.0, rel=0.02)  # linear in λ
    paper = (restored_step(1e-5, shared_optimizer()) - zero).norm()
    assert paper > 0.001 * zero.norm()  # the paper's λ moves the weights beyond the shared-momentum step's rounding

    # An own Adam state: the first step is lr·g/(|g| + eps), the same for λ = 1 and λ = 100 (only where λ·g nears
    # eps = 1e-8 does λ show at all, which at the paper's 1e-5 makes the step an artefact of eps, not of λ).
    fresh = [restored_step(w, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)) for w in (1.0, 100.0)]
    assert (fresh[0] - fresh[1]).norm() < 0.05 * fresh[1].norm()  # 100× the weight, < 5 % apart


def test_feature_steps_descend_the_feature_loss_alone():
    """Step 1 of Algorithm 1: the anchor's gradient is λ·∇ℓ_con, with no ℓ_LDM part in it."""
    method = _method(contextual_loss_weight=0.5)
    _train_only_anchor(method)
    method.loss(_batch(1), "contextual")
    method.begin_step(1)  # the iteration's end fills the queue
    loss, logs = method.loss(_batch(2), "contextual")
    assert logs["con"] > 0
    assert loss.item() == pytest.approx(0.5 * logs["con"], rel=1e-6)
    ldm_loss, ldm_logs = method.loss(_batch(2), "ldm")
    assert ldm_loss.item() == pytest.approx(ldm_logs["ldm"], rel=1e-6) and "con" not in ldm_logs


def test_update_counts_of_each_schedule():
    config = Dis2BoothConfig(class_word="cat", warmup_steps=10, delta_steps=5)
    assert Dis2Booth.updates_per_run(config, 110) == 10 + 100 * 2 * (1 + 5)  # Algorithm 1: 2(1+k) per iteration
    assert Dis2Booth.updates_per_run(Dis2BoothConfig(class_word="cat", warmup_steps=10, schedule="folded"), 110) == 10 + 100 * 6
    assert Dis2Booth.updates_per_run(Dis2BoothConfig(class_word="cat", warmup_steps=10, synchronous=True), 110) == 110
    no_con = Dis2BoothConfig(class_word="cat", warmup_steps=0, contextual_loss=False)
    assert Dis2Booth.substeps(no_con, 0) == ["ldm"] + ["delta", "ldm"] * 5
    no_delta = Dis2BoothConfig(class_word="cat", warmup_steps=0, delta_loss=False)
    assert Dis2Booth.substeps(no_delta, 0) == ["contextual", "ldm"] + ["ldm"] * 5


# -- the feature queues: a known queue, a hand-computed loss, and the current feature never in its queue ----------

E1, E2 = (1.0, 0.0), (0.0, 1.0)
CURRENT_ANCHOR = torch.tensor([[E1, E2]])  # [B = 1, P = 2 positions, c = 2]
ANCHOR_QUEUE = [torch.tensor([E1, (1.0, 1.0)]), torch.tensor([(-1.0, 0.0), (-2.0, 0.0)])]
# eq. 7-9 by hand: 1/l Σ_k 1/(hw) Σ_i min_j (1 − |cos(f_i, q_kj)|)
#   k = 1: f1 = (1,0) meets (1,0): 0;  f2 = (0,1): best (1,1), 1 − 1/√2        -> mean (1 − 1/√2)/2
#   k = 2: f1 meets (−1,0): |cos| = 1, 0;  f2 is orthogonal to both: 1       -> mean 1/2
CON_BY_HAND = ((1 - 1 / math.sqrt(2)) / 2 + 0.5) / 2  # 0.3232; with the current map in the queue it would be 0.2155
CURRENT_DELTA = torch.tensor([[E1, E2]])  # flattened (1, 0, 0, 1)
DELTA_QUEUE = [torch.tensor([E1, (0.0, 0.0)]), torch.tensor([E2, E1]), torch.tensor([E1, (0.0, -3.0)]),
               torch.tensor([(-1.0, 0.0), (0.0, -1.0)])]
# eq. 10-11 by hand, m = 0.5: |cos| of (1,0,0,1) with each flattened item, kept where ≥ m
#   (1,0,0,0): 1/√2 kept;  (0,1,1,0): 0;  (1,0,0,−3): 2/√20 = 0.447 < m, dropped;  (−1,0,0,−1): |−1| = 1 kept
DELTA_BY_HAND = (1 / math.sqrt(2) + 0 + 0 + 1) / 4  # 0.4268; with the current map in the queue it would be 0.5414


def _trained_method(**overrides):
    """A split model whose LoRA B matrices are not zero (peft starts them at zero, and a zero LoRA branch makes
    every feature the zero map, which every queue then "contains")."""
    method = _method(**overrides)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in method.lora_params.items():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return method


def _known_queue(method, key, items):
    method.queues[key] = FeatureQueue(method.config.queue_length)
    method.queues[key].push(torch.stack(items))


def _in_queue(method, key, feature):
    return any(torch.equal(item, f) for item in method.queues.get(key, FeatureQueue(1)).items for f in feature)


@pytest.mark.parametrize("adapter, current, queue, by_hand", [
    ("anchor", CURRENT_ANCHOR, ANCHOR_QUEUE, CON_BY_HAND),
    ("delta", CURRENT_DELTA, DELTA_QUEUE, DELTA_BY_HAND)])
def test_feature_loss_against_a_known_queue_matches_the_hand_computation(adapter, current, queue, by_hand):
    """The method's ℓ_con (eq. 7) and ℓ_delta (eq. 11) against a queue it did not fill: the hand value, and the
    current feature is not in the queue afterwards (pushed into it before the loss, it would compare with itself
    and pull the value down: 0.2155 / 0.5414)."""
    method = _method(max_feature_positions=256, delta_margin=0.5)
    _known_queue(method, f"{adapter}_0", queue)
    method._features[adapter] = [current]
    value = method._feature_losses(adapter, n=1)
    assert value.item() == pytest.approx(by_hand, abs=1e-6)
    assert not _in_queue(method, f"{adapter}_0", current)
    assert len(method.queues[f"{adapter}_0"].items) == len(queue)


def test_the_training_loss_compares_the_current_feature_with_the_queue_only():
    """Through the real sub-step (the UNet's hooked features): the logged ℓ_con equals eq. 7 computed by hand from
    the recorded feature and the queue as it stood, and the recorded feature is not in the queue."""
    method = _trained_method(contextual_loss_weight=1.0)
    _train_only_anchor(method)
    method.loss(_batch(1), "contextual")
    method.begin_step(1)
    queued = method.queues["anchor_0"].tensor().clone()
    _, logs = method.loss(_batch(2), "contextual")
    current = method._features["anchor"][0].detach()
    assert current.shape[1] <= method.config.max_feature_positions  # mid block: no pooling on the tiny model
    a, q = torch.nn.functional.normalize(current, dim=-1), torch.nn.functional.normalize(queued, dim=-1)
    by_hand = torch.stack([torch.stack([(1 - (a[b] @ q[k].T).abs().max(dim=1).values).mean()
                                        for k in range(len(q))]).mean() for b in range(len(a))]).mean()
    assert logs["con"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert not _in_queue(method, "anchor_0", current)


def test_queues_change_only_at_the_end_of_an_iteration():
    """The paper: "at the end of each iteration, the latest obtained features are inserted at the rear of the
    queues". All k delta sub-steps of an iteration see the same Q_d; at the next iteration's start Q_a receives the
    contextual step's features and Q_d the last delta sub-step's, one batch each."""
    method = _trained_method(delta_steps=3, contextual_loss_weight=1.0, delta_loss_weight=1.0)
    with torch.no_grad():  # one earlier iteration's feature sub-steps, so both queues hold something
        method.loss(_batch(50), "contextual")
        method.loss(_batch(51), "delta")
    method.begin_step(2)
    before = {k: [t.clone() for t in q.items] for k, q in method.queues.items()}
    seen = {}
    for i, substep in enumerate(method.schedule(2)):
        if substep == "ldm":
            continue  # no feature is recorded or pushed by an ℓ_LDM sub-step
        with torch.no_grad():
            method.loss(_batch(100 + i), substep)
        if substep in ("contextual", "delta"):
            adapter = "anchor" if substep == "contextual" else "delta"
            seen.setdefault(adapter, []).append(method._features[adapter][0].detach())
            assert all(torch.equal(x, y) for x, y in zip(method.queues[f"{adapter}_0"].items, before[f"{adapter}_0"]))
            assert len(method.queues[f"{adapter}_0"].items) == len(before[f"{adapter}_0"])  # not pushed within the iteration
    assert len(seen["delta"]) == 3
    method.begin_step(3)
    batch = len(_batch(0).latents)
    for adapter, latest in (("anchor", seen["anchor"][-1]), ("delta", seen["delta"][-1])):
        items = method.queues[f"{adapter}_0"].items
        assert len(items) == min(len(before[f"{adapter}_0"]) + batch, method.config.queue_length)
        assert all(torch.equal(x, y) for x, y in zip(items[-batch:], latest.unbind(0)))  # the latest, at the rear
    assert not any(_in_queue(method, "delta_0", f) for f in seen["delta"][:-1])  # earlier delta sub-steps: never


def test_waiting_features_survive_a_checkpoint():
    """The features waiting for the iteration's end are part of the checkpoint state, so a resume pushes them too."""
    method = _trained_method()
    with torch.no_grad():
        method.loss(_batch(1), "contextual")
    state = method.extra_state()
    assert "pending.anchor_0" in state
    other = _method()
    other.load_extra_state(state)
    other.begin_step(1)
    assert torch.equal(other.queues["anchor_0"].tensor(), state["pending.anchor_0"])

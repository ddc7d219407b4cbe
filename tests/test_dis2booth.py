"""Dis²Booth's Algorithm 1: which reading of the optimiser state makes the paper's λ matter, and the update count."""

import copy

import pytest
import torch

from personalize.backbone import load_backbone
from personalize.methods import Batch, Dis2Booth, Dis2BoothConfig


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
    method.loss(_batch(99), "contextual")  # fills the anchor queue
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
    method.loss(_batch(1), "contextual")  # fill the queue
    loss, logs = method.loss(_batch(2), "contextual")
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

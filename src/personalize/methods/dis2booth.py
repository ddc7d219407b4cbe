"""Dis²Booth (papers/dis2booth.md): learn a varied distribution with an Anchor LoRA and a Delta LoRA.

    eq. 4     W = W0 + α·ΔW_a + β·ΔW_d                           (α = β = 0.5)
    eq. 7-9   ℓ_con   = 1/l Σ_k 1/(hw) Σ_i min_j (1 − |cos(f_i^c, f_j^k)|)     anchor feature vs anchor queue
    eq. 10-11 ℓ_delta = 1/l Σ_k D(F_d^c, F_d^k),  D = |cos| if |cos| ≥ m else 0   delta feature vs delta queue
    eq. 13-14 ℓ = ℓ_LDM + λ·ℓ_con + γ·ℓ_delta                     (λ = 1e-5, γ = 1e-6)
    Alg. 1    per iteration, 2·(1+k) updates (k = 5):
                1. Anchor LoRA ← descend λ·ℓ_con                           (eq. 12; sub-step "contextual")
                2. both LoRAs  ← descend ℓ_LDM                             (sub-step "ldm")
                k times:
                3. Delta LoRA  ← descend γ·ℓ_delta                         (sub-step "delta")
                4. both LoRAs  ← descend ℓ_LDM                             (sub-step "ldm")

There is no public code; every choice the paper leaves open is made here, and listed:

1. Warm-up and split. The first `--warmup-steps` train one LoRA (rank 64 default, as the paper) with ℓ_LDM: it is
   the Anchor adapter at weight 1 while the Delta adapter is zero. At the switch both adapters are set to the
   warm-up LoRA divided by (α+β), so α·ΔW_a + β·ΔW_d equals the warm-up LoRA exactly: the model's output does not
   jump. Disentanglement then comes from the two losses alone.
2. Schedule (`--schedule`). `algorithm1` (default) runs Algorithm 1 literally: every update is its own UNet
   pass on a fresh batch, and a feature step descends λ·ℓ_con (or γ·ℓ_delta) alone. **Optimiser state**: one
   AdamW per adapter, shared by every step that updates it — the anchor's by its feature steps and the ℓ_LDM
   steps, the delta's likewise. The paper is silent; this is the reading under which λ and γ mean anything:
   Adam divides each step by the running RMS of the gradients it has seen, so a feature step with an optimiser of
   its own would move the weights by ~lr whatever λ is (λ = 1e-5 and λ = 1 alike), while in the shared state the
   feature gradient λ·∇ℓ_con is measured against the ℓ_LDM gradients' RMS and its effect scales with λ
   (tests/test_dis2booth.py shows both). A consequence stated plainly: a feature step also re-applies the shared
   first moment (β1 times the last ℓ_LDM direction), as any shared-state Adam step does. The ablations remove
   their feature steps (`--no-contextual-loss`: no step 1; `--no-delta-loss`: no step 3, the k ℓ_LDM steps stay).
   `folded` is this project's first schedule, kept for comparison: 1 + k updates per iteration, an anchor
   sub-step on ℓ_LDM + λ·ℓ_con (anchor only) then k delta sub-steps on ℓ_LDM + γ·ℓ_delta (delta only); with a
   mean-reduced ℓ_LDM the feature terms are ~1e-5 of its gradient there, so its ablations equal the full method.
   `--synchronous` (the paper's ablation): one update of both adapters on ℓ_LDM + λ·ℓ_con + γ·ℓ_delta.
   `updates_per_run` counts optimiser updates so that baselines can be compared at equal updates.
3. Features. A module's "feature" is the output of its LoRA branch (B·A·x, before scaling) at the self-attention
   output projections (`attn1.to_out.0`) of the blocks named by `--feature-blocks` (default: the mid block, the
   lowest resolution, where features are most semantic and cheapest). Tokens are spatial positions; maps are
   average-pooled to at most `--max-feature-positions` (default 256 = 16×16) so the pairwise cost of ℓ_con stays
   B·l·256² (at SDXL 1024 px an unpooled 128×128 map would be 268M pairs per queued item). Several modules: the
   losses are averaged over modules. Only instance rows are used (not prior-preservation class rows).
4. Queues. Length l (`--queue-length`, default 16) of detached per-image features. As the paper says ("at the end
   of each iteration, the latest obtained features are inserted at the rear of the queues"), a queue changes only
   between iterations: during an iteration the features a feature loss used wait, and `begin_step` of the next
   iteration pushes them — for Q_a the contextual sub-step's anchor features, for Q_d the *last* delta sub-step's
   (the latest obtained; so all k delta sub-steps of one iteration compare with the same queue, and each queue
   receives one batch per iteration). The current feature is therefore never in the queue it is compared with.
   (Until 2026-12-07 a delta sub-step pushed after its own loss, k pushes per iteration: Q_d of length 16 at
   batch 4 then held only the last four sub-steps, mostly of the same iteration. Every Dis²Booth bench row up
   to 2026-12-06 was made with that schedule.) Empty queue: the term is 0 and the sub-step makes no update.
   Queues and the waiting features are checkpointed, so resume is exact.
5. Cosine D_cos takes the absolute value (eq. 9); ℓ_delta flattens each map into one vector; m = 0.5 by default.
6. Text encoders stay frozen (as in the paper).
Export: one fused LoRA of rank 2r, exact (B = [α·s·B_a, β·s·B_d], A = [A_a; A_d], scale 1), plus the two parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PersonalizeError
from ..export import run_name
from ..howto import write_howto
from ..lora import adapter_state, scaling, set_adapter_state
from .base import Batch
from .dreambooth_lora import DreamBoothLora, DreamBoothLoraConfig, _json_safe, adapter_layers, save_lora_files


@dataclass
class Dis2BoothConfig(DreamBoothLoraConfig):
    rank: int = field(default=64, metadata={"help": "LoRA rank of the warm-up LoRA and of each of Anchor and Delta"})
    anchor_weight: float = field(default=0.5, metadata={"help": "α of eq. 4"})
    delta_weight: float = field(default=0.5, metadata={"help": "β of eq. 4"})
    warmup_steps: int = field(default=200, metadata={"help": "steps of single-LoRA fine-tuning before the split"})
    delta_steps: int = field(default=5, metadata={"help": "k: delta sub-steps per anchor sub-step (Algorithm 1)"})
    schedule: str = field(default="algorithm1", metadata={
        "help": "algorithm1: Algorithm 1 as written, 2(1+k) updates per iteration (feature steps alone, Adam state shared "
                "per adapter); folded: 1+k updates, the feature losses added to ℓ_LDM", "choices": ["algorithm1", "folded"]})
    contextual_loss_weight: float = field(default=1e-5, metadata={"help": "λ of eq. 14"})
    delta_loss_weight: float = field(default=1e-6, metadata={"help": "γ of eq. 14"})
    delta_margin: float = field(default=0.5, metadata={"help": "m of eq. 10"})
    queue_length: int = field(default=16, metadata={"help": "l: features kept in each queue"})
    feature_blocks: list[str] = field(default_factory=lambda: ["mid_block"], metadata={"help": "UNet blocks whose attn1.to_out.0 LoRA outputs are the features"})
    max_feature_positions: int = field(default=256, metadata={"help": "pool feature maps to at most this many positions"})
    contextual_loss: bool = field(default=True, metadata={"help": "ablation switch for ℓ_con (off: no contextual step)"})
    delta_loss: bool = field(default=True, metadata={"help": "ablation switch for ℓ_delta (off: no delta steps)"})
    synchronous: bool = field(default=False, metadata={"help": "ablation: one update of both adapters with ℓ_LDM + λℓ_con + γℓ_delta"})


def contextual_loss(current: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """eq. 7-9: current [B, P, c], queue [l, Q, c] -> mean over b, k, i of min_j (1 − |cos(f_bi, q_kj)|)."""
    a, q = F.normalize(current.float(), dim=-1), F.normalize(queue.float(), dim=-1)
    similarity = torch.einsum("bic,kjc->bkij", a, q).abs()
    return (1 - similarity.amax(dim=-1)).mean()


def delta_loss(current: torch.Tensor, queue: torch.Tensor, margin: float) -> torch.Tensor:
    """eq. 10-11: mean over b, k of |cos(F_b, Q_k)| where it is ≥ m, else 0 (each map flattened to one vector)."""
    cos = (F.normalize(current.flatten(1).float(), dim=-1) @ F.normalize(queue.flatten(1).float(), dim=-1).T).abs()
    return torch.where(cos >= margin, cos, torch.zeros_like(cos)).mean()


def pool_positions(feature: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[B, N, c] with N = h·w square positions -> [B, ≤max_positions, c] by average pooling."""
    b, n, c = feature.shape
    side = math.isqrt(n)
    if side * side != n or n <= max_positions:
        return feature
    target = max(1, math.isqrt(max_positions))
    grid = feature.transpose(1, 2).reshape(b, c, side, side)
    return F.adaptive_avg_pool2d(grid, target).flatten(2).transpose(1, 2)


class FeatureQueue:
    """A FIFO of at most `length` detached feature maps [P, c]."""

    def __init__(self, length: int):
        self.length, self.items = length, []

    def push(self, features: torch.Tensor) -> None:
        self.items.extend(features.detach().unbind(0))
        del self.items[: max(0, len(self.items) - self.length)]

    def tensor(self) -> torch.Tensor | None:
        return torch.stack(self.items) if self.items else None


class Dis2Booth(DreamBoothLora):
    name = "dis2booth"
    config_class = Dis2BoothConfig
    default_steps = 500
    default_lr = 1e-4
    adapters = ("anchor", "delta")
    flips = False  # our choice (the paper does not say): DreamBooth-LoRA's, the method it extends

    @classmethod
    def check(cls, config: Dis2BoothConfig, concepts: list) -> None:
        if config.train_text_encoder:
            raise PersonalizeError("dis2booth trains UNet LoRA only (the paper keeps the text encoders frozen)")
        if config.anchor_weight + config.delta_weight <= 0:
            raise PersonalizeError("--anchor-weight + --delta-weight must be positive")
        super().check(config, concepts)

    def __init__(self, config: Dis2BoothConfig, backbone, captions=None, images=None, **data):
        super().__init__(config, backbone, captions, images, **data)
        self.unet = backbone.unet
        self.register_buffer("split_done", torch.zeros(()))  # checkpointed through extra_state
        self.queues: dict[str, FeatureQueue] = {}  # "anchor_0", "delta_0", ...: one per adapter and hooked module
        self.pending: dict[str, torch.Tensor] = {}  # this iteration's latest features per queue, pushed at its end
        self._features: dict[str, list[torch.Tensor]] = {a: [] for a in self.adapters}
        self._hook_feature_modules()
        self._apply_weights()

    # -- adapters ----------------------------------------------------------------------------------------------
    def _apply_weights(self) -> None:
        weights = [self.config.anchor_weight, self.config.delta_weight] if self.split_done.item() else [1.0, 0.0]
        self.unet.set_adapters(list(self.adapters), weights=weights)

    def _split(self) -> None:
        """Choice 1: Anchor = Delta = warm-up LoRA / (α+β), so α·ΔW_a + β·ΔW_d = warm-up LoRA."""
        total = self.config.anchor_weight + self.config.delta_weight
        warm = adapter_state(self.unet, "anchor")
        shared = {k: v / total if ".lora_B." in k else v for k, v in warm.items()}
        for adapter in self.adapters:
            set_adapter_state(self.unet, adapter, shared)
        with torch.no_grad():
            self.split_done.fill_(1.0)
        self._apply_weights()

    def _group_params(self, adapter: str) -> list[torch.nn.Parameter]:
        return [p for k, p in self.lora_params.items() if k.startswith(f"{adapter}__")]

    def param_groups(self):
        """One optimiser per adapter; the warm-up LoRA is the anchor adapter, so its state carries on."""
        return {"anchor": self._group_params("anchor"), "delta": self._group_params("delta")}

    SUBSTEP_GROUPS = {"warmup": ["anchor"], "contextual": ["anchor"], "delta": ["delta"], "ldm": ["anchor", "delta"],
                      "anchor+ldm": ["anchor"], "delta+ldm": ["delta"], "both": ["anchor", "delta"]}

    @staticmethod
    def substeps(config: Dis2BoothConfig, step: int) -> list[str]:
        """The updates of iteration `step` (a function of the config alone, so a bench can count them)."""
        if step < config.warmup_steps:
            return ["warmup"]
        if config.synchronous:
            return ["both"]
        if config.schedule == "folded":
            return ["anchor+ldm"] + ["delta+ldm"] * config.delta_steps
        anchor = (["contextual"] if config.contextual_loss else []) + ["ldm"]
        return anchor + ((["delta"] if config.delta_loss else []) + ["ldm"]) * config.delta_steps

    @classmethod
    def updates_per_run(cls, config: Dis2BoothConfig, steps: int) -> int:
        return sum(len(cls.substeps(config, s)) for s in range(steps))

    def schedule(self, step: int) -> list[str]:
        return self.substeps(self.config, step)

    def substep_groups(self, substep: str) -> list[str]:
        return self.SUBSTEP_GROUPS[substep]

    def begin_step(self, step: int) -> None:
        self._push_pending()  # the end of the previous iteration (choice 4)
        # The split calls peft's set_adapters, which switches every active adapter's gradients back on: it runs
        # here, before the trainer switches them for the step's first sub-step, never inside a loss.
        if step >= self.config.warmup_steps and not self.split_done.item():
            self._split()

    def _push_pending(self) -> None:
        """The end of an iteration: the latest features of each queue join it (the paper's queue update)."""
        for key, features in self.pending.items():
            self.queues.setdefault(key, FeatureQueue(self.config.queue_length)).push(features)
        self.pending = {}

    # -- features ----------------------------------------------------------------------------------------------
    def _hook_feature_modules(self) -> None:
        found = 0
        for name, module in self.unet.named_modules():
            if not name.endswith("attn1.to_out.0") or not any(name.startswith(b) for b in self.config.feature_blocks):
                continue
            for adapter in self.adapters:
                module.lora_B[adapter].register_forward_hook(self._recorder(adapter))
            found += 1
        if not found:
            raise PersonalizeError(f"--feature-blocks {self.config.feature_blocks}: no attn1.to_out.0 LoRA module in those UNet blocks")

    def _recorder(self, adapter: str):
        def hook(module, inputs, output):
            if self.training_features:
                self._features[adapter].append(output)
        return hook

    training_features = False

    def _feature_losses(self, adapter: str, n: int) -> torch.Tensor:
        """ℓ_con (anchor, eq. 7) or ℓ_delta (delta, eq. 11) against the queue as it stood when the iteration began,
        averaged over hooked modules; the current features wait in `pending` for the iteration's end (choice 4)."""
        losses, cfg = [], self.config
        for i, feature in enumerate(self._features[adapter]):
            feature = pool_positions(feature[:n], cfg.max_feature_positions)
            key = f"{adapter}_{i}"
            queued = self.queues[key].tensor() if key in self.queues else None
            if queued is not None:
                losses.append(contextual_loss(feature, queued) if adapter == "anchor" else delta_loss(feature, queued, cfg.delta_margin))
            self.pending[key] = feature.detach()  # the latest of this iteration: a later sub-step's replaces it
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.split_done.device)

    # -- loss --------------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, substep: str):
        """The loss of one sub-step (see `substeps`): ℓ_LDM, a feature loss alone, or their sum (folded, both)."""
        cfg = self.config
        feature_terms = {"contextual": ["anchor"], "delta": ["delta"], "anchor+ldm": ["anchor"] * cfg.contextual_loss,
                         "delta+ldm": ["delta"] * cfg.delta_loss,
                         "both": ["anchor"] * cfg.contextual_loss + ["delta"] * cfg.delta_loss}.get(substep, [])
        self._features = {a: [] for a in self.adapters}
        self.training_features = bool(feature_terms)
        try:
            ldm, step = self.ldm_loss(batch)
        finally:
            self.training_features = False
        if substep == "warmup":
            return ldm, {"loss": ldm.item()}
        uses_ldm = substep not in ("contextual", "delta")
        total = ldm if uses_ldm else torch.zeros((), device=ldm.device)
        logs = {"ldm": ldm.item()}
        for adapter in feature_terms:
            weight = cfg.contextual_loss_weight if adapter == "anchor" else cfg.delta_loss_weight
            value = self._feature_losses(adapter, len(batch.latents))
            total = total + weight * value  # eq. 14's λ, γ: a feature step alone descends λ·ℓ_con (eq. 12)
            logs["con" if adapter == "anchor" else "delta"] = value.item()
        return total, logs

    # -- checkpoint state beyond parameters ---------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"queue.{k}": q.tensor().cpu() for k, q in self.queues.items() if q.items}
        state.update({f"pending.{k}": v.cpu() for k, v in self.pending.items()})  # pushed by the next begin_step
        return {**state, "split_done": self.split_done.cpu()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.split_done.device
        self.split_done.copy_(state["split_done"])
        self.queues, self.pending = {}, {}
        for key, value in state.items():
            if key.startswith("queue."):
                queue = self.queues[key[len("queue."):]] = FeatureQueue(self.config.queue_length)
                queue.items = list(value.to(device).unbind(0))
            elif key.startswith("pending."):
                self.pending[key[len("pending."):]] = value.to(device)
        self._apply_weights()

    # -- files -------------------------------------------------------------------------------------------------
    def fused_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """α·ΔW_a + β·ΔW_d as one LoRA of rank 2r, exactly: B = [α s_a B_a, β s_d B_d], A = [A_a; A_d], scale 1."""
        cfg = self.config
        anchor, delta = adapter_state(self.unet, "anchor"), adapter_state(self.unet, "delta")
        weight_a = cfg.anchor_weight * scaling(self.unet, "anchor")
        weight_d = cfg.delta_weight * scaling(self.unet, "delta")
        fused = {}
        for key in anchor:
            if ".lora_A." in key:
                fused[key] = torch.cat([anchor[key], delta[key]], dim=0)
            else:
                fused[key] = torch.cat([weight_a * anchor[key], weight_d * delta[key]], dim=1)
        return fused, 2 * cfg.rank

    def save(self, output_dir: Path, step: int) -> list[Path]:
        output_dir = Path(output_dir)
        fused, rank = self.fused_state()
        meta = _json_safe(self.unet.peft_config["anchor"].to_dict())
        fused_meta = {**meta, "r": rank, "lora_alpha": rank}
        name = run_name(output_dir)
        files = save_lora_files(self.backbone, output_dir, {"unet": fused}, {"unet": fused_meta}, {"unet": rank},
                                step=step, name=name)
        for adapter in self.adapters:  # the two parts, to recombine with set_adapters([...], [α, β])
            files += save_lora_files(self.backbone, output_dir / adapter, *adapter_layers({"unet": self.unet}, adapter),
                                     step=step, name=f"{name}-{adapter}")
        weights = (self.config.anchor_weight, self.config.delta_weight)
        recombine = (f"diffusers recombines the parts: load each with adapter_name={'/'.join(self.adapters)}, then "
                     f"pipe.set_adapters({list(self.adapters)}, {list(weights)})")
        parts = {adapter: f"the {adapter} LoRA alone (the run's LoRA above holds both); {recombine}" for adapter in self.adapters}
        return files + [write_howto(output_dir, files, self.prompt_subjects(), parts)]

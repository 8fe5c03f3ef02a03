"""Preference losses (DPO / IPO / SPPO / KTO) against hand-computed numbers and against TRL 1.16 itself.

Hand values use beta = 0.1 and a 2-pair batch with logratio_w = [2, 0], logratio_l = [-1, 0]
(so Delta = logratio_w - logratio_l = [3, 0]); the arithmetic is in the comments.

TRL agreement: TRL 1.16 has no standalone loss function; the loss lives inside ``DPOTrainer._compute_loss`` /
``KTOTrainer._compute_loss``, after a model forward. We call those unbound methods with a stub ``self`` (the
attributes ``__init__`` would set) and a stub model whose ``log_probs`` output puts each sequence's whole
log-prob on its first completion position, so TRL's per-token sums reproduce our (B,) log-probs exactly; reference
log-probs come in through the batch (``precompute_ref_log_probs``), so no reference forward runs. If a TRL upgrade
changes those internals the stub fails loudly (AttributeError/KeyError), not silently.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace
from typing import get_args

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from alignkit.losses import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    preference_rewards,
    sppo_hard_loss,
    sppo_loss,
    sppo_self_play_loss,
)

BETA = 0.1
# policy and reference summed log-probs giving logratio_w = [-10 - -12, -5 - -5] = [2, 0] and
# logratio_l = [-15 - -14, -7 - -7] = [-1, 0]
PC, RC = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
PR, RR = torch.tensor([-15.0, -7.0]), torch.tensor([-14.0, -7.0])
NEG_LOG_SIG_03 = 0.5543552444685  # -log sigma(0.3) = log(1 + e^-0.3) = log(1.7408182207)
LOG2 = math.log(2)  # -log sigma(0)

# ------------------------------------------------------------------------------------------ hand values


def test_dpo_hand_values():
    # beta*Delta = [0.3, 0]: mean(-log sigma(0.3), -log sigma(0)) = (0.5543552 + 0.6931472)/2 = 0.6237512
    assert dpo_loss(PC, PR, RC, RR, BETA).item() == pytest.approx((NEG_LOG_SIG_03 + LOG2) / 2, abs=1e-6)


def test_cdpo_label_smoothing_hand_values():
    # -(1-eps) log sigma(z) - eps log sigma(-z) = -log sigma(z) + eps*z  (since -log sigma(-z) = -log sigma(z) + z)
    # eps = 0.1: pair 1: 0.5543552 + 0.1*0.3 = 0.5843552 ; pair 2: log 2 + 0 -> mean (0.5843552 + 0.6931472)/2
    loss = dpo_loss(PC, PR, RC, RR, BETA, label_smoothing=0.1)
    assert loss.item() == pytest.approx((NEG_LOG_SIG_03 + 0.03 + LOG2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, BETA, label_smoothing=0.5)


def test_ipo_hand_values():
    # 1/(2 beta) = 5: pair 1 (3 - 5)^2 = 4 ; pair 2 (0 - 5)^2 = 25 -> mean 14.5
    assert ipo_loss(PC, PR, RC, RR, BETA).item() == pytest.approx(14.5, abs=1e-5)


def test_sppo_hard_hand_values():
    # 0.5/beta = 5: pair 1 (2 - 5)^2 + (-1 + 5)^2 = 9 + 16 = 25 ; pair 2 (0 - 5)^2 + (0 + 5)^2 = 50 -> mean 37.5
    assert sppo_hard_loss(PC, PR, RC, RR, BETA).item() == pytest.approx(37.5, abs=1e-5)


def test_sppo_soft_hand_values():
    # eta = 1/beta = 10, P = [0.8, 0.5]: targets eta(P - 1/2) = [3, 0]
    # pair 1 (2 - 3)^2 + (-1 + 3)^2 = 1 + 4 = 5 ; pair 2 (0 - 0)^2 + (0 + 0)^2 = 0 -> mean 2.5
    assert sppo_loss(PC, PR, RC, RR, BETA, prob=torch.tensor([0.8, 0.5])).item() == pytest.approx(2.5, abs=1e-5)


def test_sppo_self_play_hand_values():
    # eta = 10; P_hat_w = [0.9, 0.6] -> targets [4, 1]; P_hat_l = [0.3, 0.5] -> targets [-2, 0]
    # pair 1: 1/2 [(2 - 4)^2 + (-1 + 2)^2] = 1/2 (4 + 1) = 2.5 ; pair 2: 1/2 [(0 - 1)^2 + 0^2] = 0.5 -> mean 1.5
    loss = sppo_self_play_loss(
        torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.9, 0.6]), torch.tensor([0.3, 0.5]), BETA
    )
    assert loss.item() == pytest.approx(1.5, abs=1e-5)


def test_kto_hand_values():
    # logratio r = policy - ref = [3, 1, -1], desirable [T, T, F], z0 = 1, beta = 0.1, w_d = 1, w_u = 2:
    # 1 - sigma(0.1*(3-1)) = sigma(-0.2) = 0.4501660 ; 1 - sigma(0.1*(1-1)) = 0.5 ;
    # 2 * (1 - sigma(0.1*(1-(-1)))) = 2 * 0.4501660 = 0.9003320 -> mean over all 3 = 1.8504980/3 = 0.6168327
    pol, ref = torch.tensor([-7.0, -9.0, -11.0]), torch.tensor([-10.0, -10.0, -10.0])
    desirable = torch.tensor([True, True, False])
    loss = kto_loss(pol, ref, desirable, torch.tensor(1.0), BETA, undesirable_weight=2.0)
    assert loss.item() == pytest.approx((0.4501660 + 0.5 + 0.9003320) / 3, abs=1e-6)
    # z0 < 0 is clamped to 0: 1 - sigma(0.3) = 0.4255575, 1 - sigma(0.1) = 0.4750208, 1 - sigma(0.1) = 0.4750208
    loss = kto_loss(pol, ref, desirable, torch.tensor(-3.0), BETA)
    assert loss.item() == pytest.approx((0.4255575 + 0.4750208 + 0.4750208) / 3, abs=1e-6)


def test_kto_kl_gets_no_gradient_and_bad_inputs_raise():
    pol = torch.tensor([-7.0, -9.0], requires_grad=True)
    kl = torch.tensor(0.5, requires_grad=True)
    kto_loss(pol, torch.tensor([-10.0, -10.0]), torch.tensor([True, False]), kl, BETA).backward()
    assert kl.grad is None and pol.grad is not None
    with pytest.raises(ValueError, match="bool"):
        kto_loss(pol, pol, torch.tensor([1, 0]), kl, BETA)


def test_preference_rewards_are_beta_logratios():
    # beta * [2, 0] and beta * [-1, 0]
    rw, rl = preference_rewards(PC, PR, RC, RR, BETA)
    torch.testing.assert_close(rw, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(rl, torch.tensor([-0.1, 0.0]))


# ------------------------------------------------------------------------------------------ SPPO identities


def _random_batch(seed: int, b: int = 5, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-30 * torch.rand(b, generator=g, dtype=dtype) for _ in range(4))


def test_sppo_with_p_one_is_sppo_hard_exactly():
    pc, pr, rc, rr = _random_batch(0)
    for beta in (0.1, 1e-3):
        assert torch.equal(sppo_loss(pc, pr, rc, rr, beta, prob=1.0), sppo_hard_loss(pc, pr, rc, rr, beta))


def test_sppo_with_p_half_has_zero_targets_and_is_symmetric():
    pc, pr, rc, rr = _random_batch(1)
    lw, ll = pc - rc, pr - rr
    # P = 1/2: both log-ratios are pulled to 0, whatever beta
    torch.testing.assert_close(sppo_loss(pc, pr, rc, rr, 0.37, prob=0.5), (lw**2 + ll**2).mean())
    # swapping winner and loser together with P -> 1 - P changes nothing
    p = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(sppo_loss(pc, pr, rc, rr, 0.1, p), sppo_loss(pr, pc, rr, rc, 0.1, 1 - p))
    with pytest.raises(ValueError, match="prob"):
        sppo_loss(pc, pr, rc, rr, 0.1, prob=1.5)


def test_pairwise_sppo_is_twice_the_self_play_loss():
    # eq. 4.12 (no 1/2) vs the reference code's 1/2[...] with P_hat_w = P, P_hat_l = 1 - P
    pc, pr, rc, rr = _random_batch(3)
    p = torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    self_play = sppo_self_play_loss(pc - rc, pr - rr, p, 1 - p, 0.1)
    torch.testing.assert_close(sppo_loss(pc, pr, rc, rr, 0.1, p), 2 * self_play)


def test_table_matches_literal_and_has_uniform_signature():
    assert set(PREFERENCE_LOSSES) == set(get_args(PreferenceLoss))
    pc, pr, rc, rr = _random_batch(5)
    p = torch.full((5,), 0.7, dtype=torch.float64)
    for name, fn in PREFERENCE_LOSSES.items():
        loss = fn(pc, pr, rc, rr, 0.1, prob=p)
        assert loss.shape == () and torch.isfinite(loss), name
    torch.testing.assert_close(PREFERENCE_LOSSES["dpo"](pc, pr, rc, rr, 0.1, p), dpo_loss(pc, pr, rc, rr, 0.1))
    torch.testing.assert_close(PREFERENCE_LOSSES["sppo"](pc, pr, rc, rr, 0.1, p), sppo_loss(pc, pr, rc, rr, 0.1, p))
    with pytest.raises(ValueError, match="needs prob"):
        PREFERENCE_LOSSES["sppo"](pc, pr, rc, rr, 0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(pc, pr[:3], rc, rr, 0.1)


# ------------------------------------------------------------------------------------------ agreement with TRL


def _stub_model(log_probs_for):
    """A model forward stand-in: ``log_probs_for(input_ids)`` -> per-token log-probs (N, L-1); other outputs 0.

    TRL calls the ``model`` ARGUMENT for the forward and reads only ``self.model.training`` from ``self``.
    """

    def forward(input_ids, **_):
        n, length = input_ids.shape
        zeros = torch.zeros(n, length - 1, dtype=torch.float64)
        return SimpleNamespace(
            log_probs=log_probs_for(input_ids), entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    return forward


def _stub_self(**attrs):
    """The attributes TRL's ``__init__`` would set that ``_compute_loss`` reads (single process, training mode)."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _sequences(logps: torch.Tensor, n_tokens: list[int], fill: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """input_ids/attention_mask/completion_mask for one prompt token + n completion tokens (right-padded), and
    per-token log-probs (aligned with ``completion_mask[:, 1:]``) whose row sums are exactly ``logps``."""
    length = 1 + max(n_tokens)
    completion_mask = torch.zeros(len(n_tokens), length, dtype=torch.long)
    for i, n in enumerate(n_tokens):
        completion_mask[i, 1 : 1 + n] = 1
    per_token = torch.zeros(len(n_tokens), length - 1, dtype=torch.float64)
    per_token[:, 0] = logps  # first completion token carries the whole sum; the rest are 0
    ids = torch.full((len(n_tokens), length), fill, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask}, per_token


def _trl_dpo(loss_type: str, beta: float, pc, pr, rc, rr, n_chosen, n_rejected):
    batch, per_token = _sequences(torch.cat([pc, pr]), n_chosen + n_rejected, fill=1)  # TRL: [chosen; rejected]
    forward = _stub_model(lambda ids: per_token)
    stub = _stub_self(
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {**batch, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(stub, forward, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_ipo_sppo_hard_agree_with_trl(seed):
    pc, pr, rc, rr = _random_batch(10 + seed, b=4)
    n_chosen, n_rejected = [3, 5, 1, 4], [2, 6, 4, 1]
    beta = 0.1
    loss, metrics = _trl_dpo("sigmoid", beta, pc, pr, rc, rr, n_chosen, n_rejected)
    torch.testing.assert_close(loss, dpo_loss(pc, pr, rc, rr, beta), atol=1e-6, rtol=0)
    rw, rl = preference_rewards(pc, pr, rc, rr, beta)  # TRL logs beta * logratio as rewards/chosen, /rejected
    assert metrics["rewards/chosen"][0] == pytest.approx(rw.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"][0] == pytest.approx(rl.mean().item(), abs=1e-6)

    loss, _ = _trl_dpo("sppo_hard", beta, pc, pr, rc, rr, n_chosen, n_rejected)
    torch.testing.assert_close(loss, sppo_hard_loss(pc, pr, rc, rr, beta), atol=1e-6, rtol=0)

    # TRL's IPO divides each SUMMED log-ratio by its completion length; we get the same by passing
    # per-token-averaged log-probs (alignkit's IPO convention).
    loss, _ = _trl_dpo("ipo", beta, pc, pr, rc, rr, n_chosen, n_rejected)
    nc, nr = torch.tensor(n_chosen, dtype=pc.dtype), torch.tensor(n_rejected, dtype=pc.dtype)
    torch.testing.assert_close(loss, ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta), atol=1e-6, rtol=0)
    assert not torch.allclose(loss, ipo_loss(pc, pr, rc, rr, beta))  # ...and NOT the summed form


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # z0 > 0, and z0 < 0 (clamped to 0 by both)
def test_kto_agrees_with_trl(kl_shift):
    g = torch.Generator().manual_seed(20)
    b = 5
    pol, ref = (
        -30 * torch.rand(b, generator=g, dtype=torch.float64),
        -30 * torch.rand(b, generator=g, dtype=torch.float64),
    )
    kl_ref = -30 * torch.rand(b, generator=g, dtype=torch.float64)
    kl_pol = kl_ref + kl_shift + torch.randn(b, generator=g, dtype=torch.float64) * 0.1
    desirable = torch.tensor([True, False, True, True, False])
    n_tokens = [3, 1, 4, 2, 5]
    main, main_tok = _sequences(pol, n_tokens, fill=1)
    kl_batch, kl_tok = _sequences(kl_pol, n_tokens[1:] + n_tokens[:1], fill=2)  # mismatched pairs, ids differ
    forward = _stub_model(lambda ids: kl_tok if bool((ids == 2).all()) else main_tok)
    stub = _stub_self(
        beta=BETA,
        loss_type="kto",
        calculate_KL=True,
        desirable_weight=1.3,
        undesirable_weight=0.7,
    )
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)  # TRL's own z0 forward on KL_* ids
    inputs = {
        **main,
        **{f"KL_{k}": v for k, v in kl_batch.items()},
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    trl_loss = KTOTrainer._compute_loss(stub, forward, inputs, return_outputs=False)
    z0 = (kl_pol - kl_ref).mean()  # kto_loss detaches and clamps it itself
    ours = kto_loss(pol, ref, desirable, z0, BETA, desirable_weight=1.3, undesirable_weight=0.7)
    torch.testing.assert_close(trl_loss, ours, atol=1e-6, rtol=0)
    assert stub._metrics["train"]["kl"][0] == pytest.approx(max(z0.item(), 0.0))

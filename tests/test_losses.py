"""alignkit.losses against numbers worked out by hand (arithmetic in the comments); no model loaded."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (
    MEMBER_LOSSES,
    _bin_index,
    auroc,
    bradley_terry,
    calibration,
    ece_standard,
    ensemble_mean,
    ensemble_reward_loss,
    nnm_diversity,
    nuclear_norm_ratio,
    uncertainty,
)

# ------------------------------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_hand_values():
    # -log sigma(1) = log(1 + e^-1) = 0.31326169 ; -log sigma(0) = log 2 = 0.69314718
    loss = bradley_terry(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.31326169 + 0.69314718) / 2, abs=1e-7)


def test_bradley_terry_margin_and_stability():
    # margin 1 turns the first pair's difference 1 into 0 -> both pairs give log 2
    loss = bradley_terry(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    # -log sigma(-200) = 200 (log-sigmoid, not log(sigmoid) -> inf)
    assert bradley_terry(torch.tensor([0.0]), torch.tensor([200.0])).item() == pytest.approx(200.0)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry(torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------------------------------ NNM


def test_nnm_orthogonal_members_give_sqrt2():
    # cat([[1,0]], [[0,1]]) = I2: singular values 1,1 -> nuclear 2, Frobenius sqrt(2), ratio sqrt(2)
    a1, a2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert nnm_diversity([[a1, a2]]).item() == pytest.approx(math.sqrt(2), abs=1e-6)


def test_nnm_same_direction_is_rank_one():
    # cat([[1,0]], [[2,0]]) has rank 1: singular values sqrt(5), 0 -> ratio sqrt5/sqrt5 = 1
    a1, a2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    assert nnm_diversity([[a1, a2]]).item() == pytest.approx(1.0, abs=1e-6)


def test_nnm_value_and_gradient_by_hand():
    # cat = diag(3, 4): singular values 3, 4 -> nuclear 7, Frobenius 5, ratio 7/5.
    # d(N/F)/dA = U V^T / F - N A / F^3 with U V^T = I:
    #   = I/5 - 7 diag(3,4)/125 = diag(0.2 - 0.168, 0.2 - 0.224) = diag(0.032, -0.024), off-diagonal 0.
    a1 = torch.tensor([[3.0, 0.0]], requires_grad=True)
    a2 = torch.tensor([[0.0, 4.0]], requires_grad=True)
    ratio = nnm_diversity([[a1, a2]])
    assert ratio.item() == pytest.approx(1.4, abs=1e-6)
    ratio.backward()
    assert a1.grad.tolist()[0] == pytest.approx([0.032, 0.0], abs=1e-6)
    assert a2.grad.tolist()[0] == pytest.approx([0.0, -0.024], abs=1e-6)


def test_nnm_averages_over_modules():
    # module 1: diag(3,4) -> 7/5 ; module 2: I2 -> sqrt(2). Mean = (1.4 + 1.41421356)/2 = 1.40710678.
    # Each module's gradient is halved by the 1/M: a1 gets [0.016, 0], a2 gets [0, -0.012].
    a1 = torch.tensor([[3.0, 0.0]], requires_grad=True)
    a2 = torch.tensor([[0.0, 4.0]], requires_grad=True)
    b1, b2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    value = nnm_diversity([[a1, a2], [b1, b2]])
    assert value.item() == pytest.approx(1.40710678, abs=1e-6)
    value.backward()
    assert a1.grad.tolist()[0] == pytest.approx([0.016, 0.0], abs=1e-6)
    assert a2.grad.tolist()[0] == pytest.approx([0.0, -0.012], abs=1e-6)


def test_nnm_zero_matrix_is_zero_without_nan_grad_and_low_precision_upcast():
    a = torch.zeros(2, 3, requires_grad=True)
    ratio = nuclear_norm_ratio(a)
    ratio.backward()
    assert ratio.item() == 0.0
    assert torch.equal(a.grad, torch.zeros(2, 3))
    # bf16 input is computed in fp32 (svdvals has no bf16 kernel): diag(3,4) -> 1.4
    r = nuclear_norm_ratio(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.bfloat16))
    assert r.dtype == torch.float32 and r.item() == pytest.approx(1.4, abs=1e-6)
    with pytest.raises(ValueError):
        nnm_diversity([])


# ------------------------------------------------------------------------------------------ ensemble loss


def test_ensemble_loss_mean_vs_each_and_lambda():
    # N=2 members, B=1 pair. Member diffs: 2 - 0 = 2 and 0 - 0 = 0.
    # "mean": mean rewards 1 vs 0 -> -log sigma(1) = 0.31326169
    # "each": mean(-log sigma(2), -log sigma(0)) = mean(0.12692801, 0.69314718) = 0.41003760
    rc = torch.tensor([[2.0], [0.0]])
    rr = torch.tensor([[0.0], [0.0]])
    a = [[torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]]  # nnm = 7/5
    out = ensemble_reward_loss(rc, rr, a, lam=0.0, member_loss="mean")
    assert out["bt"].item() == pytest.approx(0.31326169, abs=1e-6)
    assert out["nnm"].item() == pytest.approx(1.4, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.31326169, abs=1e-6)
    each = ensemble_reward_loss(rc, rr, a, lam=0.0, member_loss="each")
    assert each["bt"].item() == pytest.approx((0.12692801 + 0.69314718) / 2, abs=1e-6)
    # lam = 0.1 lowers the loss by 0.1 * 1.4 = 0.14: 0.31326169 - 0.14 = 0.17326169
    out = ensemble_reward_loss(rc, rr, a, lam=0.1, member_loss="mean")
    assert out["loss"].item() == pytest.approx(0.17326169, abs=1e-6)
    assert set(MEMBER_LOSSES) == {"mean", "each"}


def test_ensemble_loss_validation_and_lambda_zero_baseline():
    rc, rr = torch.zeros(2, 1), torch.zeros(2, 1)
    assert ensemble_reward_loss(rc, rr, [], lam=0.0)["nnm"].item() == 0.0
    with pytest.raises(ValueError, match="a_by_module"):
        ensemble_reward_loss(rc, rr, [], lam=0.1)
    with pytest.raises(ValueError, match="member_loss"):
        ensemble_reward_loss(rc, rr, [], lam=0.0, member_loss="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, B\)"):
        ensemble_reward_loss(torch.zeros(2), torch.zeros(2), [], lam=0.0)


# ------------------------------------------------------------------------------------------ uncertainty


def test_uncertainty_is_population_std():
    # members 1 and 3: mean 2, deviations +-1 -> population std sqrt((1+1)/2) = 1 (sample std would be sqrt 2)
    r = torch.tensor([[1.0], [3.0]])
    assert uncertainty(r).tolist() == pytest.approx([1.0])
    assert ensemble_mean(r).tolist() == pytest.approx([2.0])


# ------------------------------------------------------------------------------------------ calibration


def test_calibration_hand_example():
    d = [2.0, 1.0, -1.0, 0.5, -2.0, 0.1, 0.02, -0.03]
    # max|d| = 2 -> s = logit(0.99)/2 = ln(99)/2 = 2.29755993, so p = sigma(s d) = 1 / (1 + 99^(-d/2)):
    #   d=2    p = 0.99                    bin floor(15 p) = floor(14.85) = 14
    #   d=1    p = sqrt99/(sqrt99+1) = 0.90867475  -> 13
    #   d=-1   p = 1/(1+sqrt99)     = 0.09132525  -> 1
    #   d=0.5  p = 1/(1+99^-0.25)   = 0.75928800  -> 11
    #   d=-2   p = 0.01                            -> 0
    #   d=0.1  p = 1/(1+99^-0.05)   = 0.55718765  -> 8
    #   d=0.02 p = 1/(1+99^-0.01)   = 0.51148578  -> 7   (bin 7 = [7/15, 8/15) straddles 0.5)
    #   d=-.03 p = 1/(1+99^0.015)   = 0.48277512  -> 7
    # Singleton bins: ACC = 1[d>0], |ACC - CONF| = 0.01, 0.09132525, 0.09132525, 0.24071200, 0.01, 0.44281235
    #   sum = 0.88617485
    # Bin 7: ACC = 1/2, CONF = (0.51148578 + 0.48277512)/2 = 0.49713045, gap 0.00286955, weight 2
    # ECE = (0.88617485 + 2 * 0.00286955) / 8 = 0.89191395 / 8 = 0.11148924
    out = calibration(d)
    assert out["scale"] == pytest.approx(2.29755993, abs=1e-7)
    assert out["ece"] == pytest.approx(0.11148924, abs=1e-6)
    assert out["accuracy"] == pytest.approx(5 / 8)  # d > 0 for 2, 1, 0.5, 0.1, 0.02
    counts = [b["count"] for b in out["bins"]]
    assert counts == [1, 1, 0, 0, 0, 0, 0, 2, 1, 0, 0, 1, 0, 1, 1]
    b7 = out["bins"][7]
    assert (b7["lo"], b7["hi"]) == pytest.approx((7 / 15, 8 / 15))
    assert b7["acc"] == 0.5 and b7["conf"] == pytest.approx(0.49713045, abs=1e-7)
    assert out["bins"][2]["acc"] is None  # empty bins are JSON-safe
    # Same numbers from an fp32 tensor input (up to fp32 rounding of d).
    assert calibration(torch.tensor(d))["ece"] == pytest.approx(out["ece"], abs=1e-7)  # fp32 d: 0.1 rounds


def test_bin_edges_upper_bin_and_one_in_last():
    # k/15 exactly on an interior edge goes to the upper bin k; 1.0 (the right end) joins bin 14; 0 -> bin 0.
    p = torch.tensor([0.0, 1 / 15, 7 / 15, 0.5, 14 / 15, 0.99, 1.0], dtype=torch.float64)
    assert _bin_index(p, 15).tolist() == [0, 1, 7, 7, 14, 14, 14]


def test_calibration_extreme_pair_goes_to_last_bin_and_all_zero():
    # the largest |d| maps to 0.99 -> bin 14 (the top), its mirror to 0.01 -> bin 0
    out = calibration([3.0, -3.0])
    assert out["bins"][14]["count"] == 1 and out["bins"][0]["count"] == 1
    # all d = 0: p := 0.5 (bin 7), ACC = 0 (no d > 0), ECE = |0 - 0.5| = 0.5, scale reported 0
    out = calibration(torch.zeros(4))
    assert out["ece"] == 0.5 and out["accuracy"] == 0.0 and out["scale"] == 0.0
    assert out["bins"][7]["count"] == 4
    with pytest.raises(ValueError):
        calibration([])
    with pytest.raises(ValueError):
        calibration([1.0, float("nan")])


def test_paper_ece_is_a_sharpness_score_not_calibration():
    # A perfectly calibrated, 70 %-accurate model: every pair has confidence 0.7, 7 of 10 are right.
    # Paper metric (max_conf=0.7 so the rescale is the identity): bin of 0.7 has ACC 1, CONF 0.7; bin of
    # 0.3 has ACC 0, CONF 0.3 -> ECE = 0.7*0.3 + 0.3*0.3 = 0.30 = 1 - accuracy.
    d = [1.0] * 7 + [-1.0] * 3
    assert calibration(d, max_conf=0.7)["ece"] == pytest.approx(0.30, abs=1e-9)
    # Standard ECE: all confidences 0.7, accuracy 0.7 -> 0.
    assert ece_standard([0.7] * 7 + [0.3] * 3)["ece"] == pytest.approx(0.0, abs=1e-9)
    # The paper's definition is bounded by mean min(p, 1-p) <= 0.5 (so Table 1's 0.515 cannot come from it).
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200, generator=g, dtype=torch.float64)
    out = calibration(d)
    p = torch.sigmoid(out["scale"] * d)
    assert out["ece"] <= float(torch.minimum(p, 1 - p).mean()) + 1e-12 <= 0.5


def test_ece_standard_hand_example():
    p = [0.9, 0.8, 0.3, 0.6, 0.5, 1.0, 0.95, 0.02]
    # confidence max(p, 1-p): 0.9, 0.8, 0.7, 0.6, 0.5, 1.0, 0.95, 0.98 ; correct = p > 0.5: 1,1,0,1,0,1,1,0
    # bins (width 1/15): 0.9 -> 13 ; 0.8 = 12/15 -> 12 (edge, upper) ; 0.7 -> 10 ; 0.6 = 9/15 -> 9 ;
    #   0.5 -> 7 ; 1.0, 0.95, 0.98 -> 14
    # gaps: |1-.9| = .1, |1-.8| = .2, |0-.7| = .7, |1-.6| = .4, |0-.5| = .5 ;
    #   bin 14: ACC 2/3, CONF (1 + .95 + .98)/3 = 2.93/3, gap 0.93/3 = 0.31, weight 3 -> 0.93
    # ECE = (.1 + .2 + .7 + .4 + .5 + .93) / 8 = 2.83 / 8 = 0.35375 ; accuracy 5/8
    out = ece_standard(torch.tensor(p, dtype=torch.float64))
    assert out["ece"] == pytest.approx(0.35375, abs=1e-9)
    assert out["accuracy"] == pytest.approx(0.625)
    assert [b["count"] for b in out["bins"]][7:] == [1, 0, 1, 1, 0, 1, 1, 3]
    with pytest.raises(ValueError):
        ece_standard([1.5])


# ------------------------------------------------------------------------------------------ AUROC


def test_auroc_hand_values():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([1.0, 2.0], [1.0, 2.0]) == 0.5
    # negatives [0, 1, 1], positives [1, 2]: pairs (pos, neg):
    #   pos 1: vs 0 win (1), vs 1 tie (1/2), vs 1 tie (1/2) -> 2
    #   pos 2: wins all three -> 3
    # AUROC = 5 / (2 * 3) = 0.8333...
    assert auroc(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(5 / 6)


def test_auroc_matches_brute_force_on_random_data():
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 6, (40,), generator=g).double()  # small integer range -> many ties
    pos = torch.randint(2, 8, (30,), generator=g).double()
    diff = pos[:, None] - neg[None, :]  # brute force O(n^2): win 1, tie 1/2
    brute = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auroc(neg, pos) == pytest.approx(brute, abs=1e-12)

import pytest
import torch

from hf_taskdistill.losses import FEATURE_LOSS_TYPES, feature_distillation_loss, feature_loss, valid_positions


def _labels(B=2, T=6, prompt=2):
    labels = torch.randint(5, 20, (B, T))
    labels[:, :prompt] = -100
    return labels


def test_valid_positions_is_the_causal_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, 5, 6, 9]])
    mask = valid_positions(labels)
    # position t is valid when labels[t + 1] is supervised; the last position never is
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_zero_for_identical_inputs(loss_type):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    mask = valid_positions(_labels())
    var = x[mask].var(0)
    out = feature_loss(x.clone(), x.clone(), mask, loss_type, teacher_var=var)
    assert out.mean.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_positive_for_different_inputs(loss_type):
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = valid_positions(_labels())
    out = feature_loss(s, t, mask, loss_type, teacher_var=torch.ones(5))
    assert out.mean.item() > 0.05


def test_correlation_is_invariant_to_scale_and_offset_per_unit():
    torch.manual_seed(0)
    t = torch.randn(2, 6, 4)
    s = t * torch.tensor([3.0, 0.5, 2.0, 7.0]) + torch.tensor([1.0, -2.0, 0.0, 5.0])
    mask = valid_positions(_labels())
    out = feature_loss(s, t, mask, "correlation")
    assert out.mean.item() == pytest.approx(0.0, abs=1e-4)
    assert out.mean_corr == pytest.approx(1.0, abs=1e-4)
    anti = feature_loss(-s, t, mask, "correlation")
    assert anti.mean.item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_masked_positions_do_not_count(loss_type):
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    labels = _labels()
    mask = valid_positions(labels)
    s2 = s.clone()
    s2[~mask] = 1e3  # garbage where nothing is supervised
    a = feature_loss(s, t, mask, loss_type, teacher_var=torch.ones(5)).loss_sum
    b = feature_loss(s2, t, mask, loss_type, teacher_var=torch.ones(5)).loss_sum
    assert torch.allclose(a, b)


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_no_valid_token_is_finite_zero_with_gradient_path(loss_type):
    s = torch.randn(2, 6, 5, requires_grad=True)
    t = torch.randn(2, 6, 5)
    labels = torch.full((2, 6), -100)
    loss = feature_distillation_loss(s, t, labels, loss_type, num_items_in_batch=0, teacher_var=torch.ones(5))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_constant_units_are_finite():
    # a constant student unit and a constant teacher unit: no NaN, no inf gradient
    s = torch.zeros(1, 5, 3, requires_grad=True)
    t = torch.randn(1, 5, 3)
    t[..., 1] = 4.0
    labels = torch.zeros(1, 5, dtype=torch.long)
    loss = feature_distillation_loss(s, t, labels, "correlation")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_gradient_reaches_student_not_teacher(loss_type):
    torch.manual_seed(0)
    s = torch.randn(2, 6, 8, requires_grad=True)
    t = torch.randn(2, 6, 4, requires_grad=True)
    loss = feature_distillation_loss(s, t, _labels(), loss_type, teacher_var=torch.ones(4))
    loss.backward()
    assert t.grad is None or (t.grad == 0).all()
    # only the first k = 4 student units are matched
    assert s.grad[..., :4].abs().sum() > 0 and (s.grad[..., 4:] == 0).all()


@pytest.mark.parametrize("loss_type", ["mse", "nmse", "cosine"])
def test_sum_forms_are_exactly_gradient_accumulation_invariant(loss_type):
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    labels = _labels(4)
    var = torch.rand(5) + 0.5
    n_items = (labels[:, 1:] != -100).sum()
    full = feature_distillation_loss(s, t, labels, loss_type, num_items_in_batch=n_items, teacher_var=var)
    halves = sum(
        feature_distillation_loss(s[i : i + 2], t[i : i + 2], labels[i : i + 2], loss_type, n_items, var)
        for i in (0, 2)
    )
    assert torch.allclose(full, halves, atol=1e-6)
    assert torch.allclose(full, feature_distillation_loss(s, t, labels, loss_type, teacher_var=var), atol=1e-6)


def test_correlation_is_approximately_gradient_accumulation_invariant():
    torch.manual_seed(0)
    t = torch.randn(8, 12, 6)
    s = t + 0.7 * torch.randn(8, 12, 6)
    labels = _labels(8, 12, 3)
    n_items = (labels[:, 1:] != -100).sum()
    full = feature_distillation_loss(s, t, labels, "correlation", n_items)
    halves = sum(
        feature_distillation_loss(s[i : i + 4], t[i : i + 4], labels[i : i + 4], "correlation", n_items)
        for i in (0, 4)
    )
    assert halves.item() == pytest.approx(full.item(), rel=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one of"):
        feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), "l1")
    with pytest.raises(ValueError, match="differ"):
        feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="variances"):
        feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), "nmse")


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_forward_and_backward_never_wait_for_the_device(loss_type):
    """No `.item()`, no boolean indexing: on a GPU the feature term adds no host sync to the step."""
    from .sync_ops import HostSyncRecorder

    s = torch.randn(2, 6, 8, requires_grad=True)
    t = torch.randn(2, 6, 4)
    with HostSyncRecorder() as rec:
        out = feature_loss(s[..., :4], t, valid_positions(_labels()), loss_type, teacher_var=torch.ones(4))
        loss = feature_distillation_loss(s, t, _labels(), loss_type, torch.tensor(7), teacher_var=torch.ones(4))
        (loss + out.mean).backward()
        _ = out.mean_corr
    assert rec.syncs == []
    # and the recorder does see the usual culprits
    with HostSyncRecorder() as rec:
        _ = float(s.detach()[valid_positions(_labels())].sum())
    assert any("bool mask" in op for op in rec.syncs) and any("_local_scalar_dense" in op for op in rec.syncs)


def test_masked_statistics_match_the_selected_rows():
    """The masked-sum correlation equals the textbook one computed on s[mask], t[mask]."""
    torch.manual_seed(1)
    s, t = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    t[..., 2] = 1.5  # a constant teacher unit: left out of the mean
    mask = valid_positions(_labels(3, 7, 2))
    ref_s, ref_t = s[mask], t[mask]
    rho = torch.stack([torch.corrcoef(torch.stack([ref_s[:, j], ref_t[:, j]]))[0, 1] for j in (0, 1, 3, 4)])
    out = feature_loss(s, t, mask, "correlation")
    assert out.num_tokens.item() == mask.sum().item()
    assert out.mean.item() == pytest.approx((1 - rho).mean().item(), abs=1e-4)
    assert out.mean_corr.item() == pytest.approx(rho.mean().item(), abs=1e-4)


@pytest.mark.parametrize("loss_type", FEATURE_LOSS_TYPES)
def test_nan_at_masked_positions_does_not_leak(loss_type):
    s = torch.randn(2, 6, 5)
    s[:, -1] = float("nan")  # the last position is never valid
    s.requires_grad_(True)
    t = torch.randn(2, 6, 5)
    loss = feature_distillation_loss(s, t, _labels(), loss_type, teacher_var=torch.ones(5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()

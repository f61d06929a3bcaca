"""afa_ext.reference.l2sp_loss: 0.5 * sum over parameters not excluded of ||w - w_source||^2."""

import copy

import pytest
import torch
from torch import nn

from afa_ext.reference import l2sp_loss


def make_model_and_source_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    source_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model, source_state


def float64_model(model, source_state, exclude=()):
    total = torch.zeros((), dtype=torch.float64)
    for name, param in model.named_parameters():
        if not name.startswith(tuple(exclude)):
            total += ((param.detach().double() - source_state[name].double()) ** 2).sum()
    return 0.5 * total


def test_value_and_gradient_match_the_formula():
    model, source_state = make_model_and_source_state()
    loss = l2sp_loss(model, source_state)
    torch.testing.assert_close(loss.double(), float64_model(model, source_state), rtol=1e-6, atol=0)
    (loss * 1.7).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, 1.7 * (param.detach() - source_state[name]), rtol=1e-6, atol=1e-7)


def test_excluded_head_gets_no_term_and_no_gradient():
    model, source_state = make_model_and_source_state()
    del source_state["3.weight"], source_state["3.bias"]  # a new head has no source value
    loss = l2sp_loss(model, source_state, exclude=("3.",))
    torch.testing.assert_close(loss.double(), float64_model(model, source_state, ("3.",)), rtol=1e-6, atol=0)
    loss.backward()
    assert model[3].weight.grad is None and model[0].weight.grad is not None


def test_frozen_parameters_count_but_get_no_gradient():
    model, source_state = make_model_and_source_state()
    model[0].weight.requires_grad_(False)
    loss = l2sp_loss(model, source_state)
    torch.testing.assert_close(loss.double(), float64_model(model, source_state), rtol=1e-6, atol=0)


def test_missing_and_mismatched_source_values_are_named():
    model, source_state = make_model_and_source_state()
    missing = dict(source_state)
    del missing["0.weight"]
    with pytest.raises(KeyError, match=r"'0\.weight' has no source value"):
        l2sp_loss(model, missing)
    wrong = dict(source_state, **{"3.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"'3\.bias' has shape \(5,\) but its source value has shape \(7,\)"):
        l2sp_loss(model, wrong)


def test_everything_excluded_gives_zero():
    model, source_state = make_model_and_source_state()
    assert l2sp_loss(model, source_state, exclude=("",)).item() == 0.0

import torch
from torch import nn

from product_key_memory import PKM, fetch_optimizer_parameters, fetch_pkm_value_parameters

SMALL = dict(dim=8, heads=2, num_keys=4, topk=2, dim_head=4)


def model_with_shared_table():
    first = PKM(**SMALL)
    return nn.ModuleDict(dict(proj=nn.Linear(8, 8), first=first, second=PKM(**SMALL, values=first.values), third=PKM(**SMALL)))


def test_every_parameter_exactly_once():
    model = model_with_shared_table()
    values, rest = fetch_pkm_value_parameters(model)
    assert [id(p) for p in values] == [id(model["first"].values.weight), id(model["third"].values.weight)]
    ids = [id(p) for p in values + rest]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_groups_have_030_shape_and_optional_weight_decay():
    model = model_with_shared_table()
    groups = fetch_optimizer_parameters(model)
    assert [set(g) for g in groups] == [{"params"}, {"params", "lr"}]
    assert groups[1]["lr"] == 1e-2
    groups = fetch_optimizer_parameters(model, pkm_learning_rate=0.5, pkm_weight_decay=0.0)
    assert groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)  # torch refuses duplicates across groups
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0

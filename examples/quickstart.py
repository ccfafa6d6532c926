"""Drop a PKM into a residual block and fit a toy regression for a few steps."""

import torch

from product_key_memory import PKM, fetch_optimizer_parameters

torch.manual_seed(0)
pkm = PKM(dim=64, heads=4, num_keys=32, topk=8, dim_head=32)
opt = torch.optim.Adam(fetch_optimizer_parameters(pkm, pkm_learning_rate=1e-2), lr=1e-3)
x = torch.randn(8, 16, 64)
target = torch.randn(8, 16, 64)
for step in range(50):
    loss = (x + pkm(x) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == 49:
        print(f"step {step:2d}  loss {loss.item():.4f}")

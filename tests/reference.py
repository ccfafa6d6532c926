"""A plain PKM forward written from the paper's equations (arXiv 1907.05242, sec. 3), slot by slot.

It scores every one of the num_keys ** 2 slots of every head directly, so it shares
no search code with the library.
"""

import torch
import torch.nn.functional as F


def reference_pkm(pkm, x, input_mask=None):
    """Eval-mode (no dropout) output of ``pkm`` for ``x`` of shape ``(N, dim)``."""
    n_tok = x.shape[0]
    h, n, d, k = pkm.heads, pkm.num_keys, pkm.dim_head, pkm.topk
    if input_mask is None:
        input_mask = torch.ones(n_tok, dtype=torch.bool)
    x = pkm.pre_layernorm(x)
    q = (x @ pkm.to_queries.weight.t()).view(n_tok, 2, h, d)
    if pkm.use_layernorm:
        q = F.layer_norm(q, (d,), pkm.norm.weight, pkm.norm.bias, pkm.norm.eps)
    else:
        bn = pkm.norm.fn
        if pkm.training:
            rows = q[input_mask].reshape(-1, d)
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        q = (q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    outs = []
    for t in range(n_tok):
        if not input_mask[t]:
            outs.append(torch.zeros(pkm.dim, dtype=x.dtype))
            continue
        head_reads = []
        for head in range(h):
            # score of slot (i, j) = <q1, k1_i> + <q2, k2_j>
            s1 = pkm.keys[head, :, 0] @ q[t, 0, head]
            s2 = pkm.keys[head, :, 1] @ q[t, 1, head]
            slot_scores = (s1[:, None] + s2[None, :]).reshape(n * n)
            best, slots = slot_scores.topk(k)
            w = torch.relu(best) if pkm.non_competitive_gates else torch.softmax(best, dim=-1)
            head_reads.append((w[:, None] * pkm.values.weight[slots]).sum(0))
        if pkm.concat_values_and_combine:
            out = pkm.combine.weight @ torch.cat(head_reads)
        else:
            out = torch.stack(head_reads).sum(0)
        outs.append(pkm.output_norm(out))
    return torch.stack(outs) if outs else torch.zeros(0, pkm.dim, dtype=x.dtype)

"""Run by tests/gradients/test_ce_kernel.py in a subprocess with TRITON_INTERPRET=1 (argv[1]: repo root)."""
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
sys.path.insert(0, sys.argv[1])
from spectral_lens.gradients import _ce_kernel as K, fused_head as fh
from spectral_lens.gradients import linear_cross_entropy
g = torch.Generator().manual_seed(0)
out = {}
# kernels vs torch on random blocks, V not a multiple of BLOCK_V, targets at the edges
for dtype, offset in ((torch.float32, 300.0), (torch.bfloat16, 300.0), (torch.float32, 1e4)):
    for c, v in ((1, 5), (7, 2048), (33, 5000)):
        z = (torch.randn(c, v, generator=g) * 8 + offset).to(dtype)
        t = torch.randint(0, v, (c,), generator=g); t[0] = v - 1
        if c > 1: t[1] = 0
        m, ls, loss = K.row_lse(z, t)
        z32 = z.float()
        ref_lse = torch.logsumexp(z32.double(), -1)
        ref_loss = ref_lse - z32.double().gather(-1, t[:, None]).squeeze(-1)
        w = torch.rand(c, generator=g); w[-1] = 0
        gk = K.softmax_grad(z, t, m, ls, w)
        p = (z32.double() - ref_lse[:, None]).exp() * w.double()[:, None]
        p.scatter_(-1, t[:, None], 0.0)
        p.scatter_(-1, t[:, None], -p.sum(-1, keepdim=True))
        scale = float(p.abs().max()) + 1e-30
        logv = float(torch.log(torch.tensor(float(v))))
        out[f"{dtype}-{offset:g}-{c}-{v}"] = dict(
            lse_err=float((m.double() + ls.double() - ref_lse).abs().max() / (z32.abs().max() + logv)),
            max_exact=bool(torch.equal(m, z32.amax(-1))),
            loss_err=float(((loss.double() - ref_loss).abs() / (ref_loss.abs() + logv)).max()),
            g_err=float((gk.double() - p).abs().max() / scale),
            g_dtype=str(gk.dtype))
# the chunked loss with the kernels (forced on CPU under the interpreter) vs without
for dtype, head_grad in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)):
    h = torch.randn(50, 16, generator=g).to(dtype).requires_grad_()
    wt = (torch.randn(3000, 16, generator=g) * 0.5).to(dtype).requires_grad_(head_grad)
    t = torch.randint(0, 3000, (50,), generator=g); t[3] = -100
    res = {}
    for name, use in (("kernel", True), ("torch", False)):
        fh._kernels = (lambda hh, dt: K) if use else (lambda hh, dt: None)
        loss = linear_cross_entropy(h, wt, t, chunk_rows=16)
        (gh,) = torch.autograd.grad((loss * torch.linspace(0.5, 2, 50)).sum(), h)
        res[name] = (loss.detach(), gh.float())
    out[f"loss-{dtype}-headgrad{head_grad}"] = dict(
        loss_err=float((res["kernel"][0] - res["torch"][0]).abs().max()),
        grad_err=float((res["kernel"][1] - res["torch"][1]).abs().max() / res["torch"][1].abs().max()),
        ignored_zero=bool(res["kernel"][0][3] == 0))
print(json.dumps(out))
# the fused forward kernel (log-sum-exp and unit-weight gradient in one launch) against the two kernels
fused = {}
for dtype in (torch.float32, torch.bfloat16):
    z = (torch.randn(9, 4100, generator=g) * 5 - 20).to(dtype)
    t = torch.randint(0, 4100, (9,), generator=g); t[0] = 4099
    w = (torch.rand(9, generator=g) > 0.3).float()
    m, ls, loss, gg = K.lse_and_grad(z, t, w)
    m2, ls2, loss2 = K.row_lse(z, t)
    g2 = K.softmax_grad(z, t, m2, ls2, w)
    fused[str(dtype)] = bool(torch.equal(m, m2) and torch.equal(ls, ls2) and torch.equal(loss, loss2) and torch.equal(gg, g2))
print(json.dumps(fused))

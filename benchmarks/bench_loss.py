"""The probe's default loss on bf16 logits: PyTorch's autocast cross-entropy against ours.

For one chunk of tokens (N = chunk x sequence length) over a 50k vocabulary, in one run:

* ``head_nograd``   the bf16 head ``h @ W^T`` under ``torch.no_grad`` (what a bare forward pays);
* ``torch_ce``      head + ``F.cross_entropy(reduction="none")`` under autocast + the head input gradient
                    (autocast casts the (N, V) logits to float32 first; this was the probe's path);
* ``ours``          head + ``token_cross_entropy(method="recompute")`` + the head input gradient;
* ``*_loss_only``   the same two losses on fixed bf16 logits: loss and gradient of the logits only.

Also counts the bytes of (N x V) arrays that each path's ATen ops read and write (a dispatch-mode
tally, one count per op operand: a lower bound on memory traffic, identical on any device), the
maximum error of the loss, and the relative (Frobenius) error of the returned gradient (head input for
the head cases, logits for the loss-only cases) against float64 on the same bf16 logits.

    python benchmarks/bench_loss.py --device cuda --out runs/bench_loss.json
    python benchmarks/bench_loss.py --device cpu --tokens 2048 --vocab 8192 --loss-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import measure  # noqa: E402

from spectral_lens.atomic import write_json_atomic  # noqa: E402
from spectral_lens.gradients import token_cross_entropy  # noqa: E402


class VocabBytes(TorchDispatchMode):
    """Tallies the bytes of (N x V) arrays that ATen ops read and write.

    Each distinct (N, V) operand of an op counts once as a read and each (N, V) result once as a write
    (an in-place op's ``self`` counts as both). Views, ``new_*`` factories and allocations (``empty*``)
    move nothing and are skipped; gather, scatter and index_put touch N elements of an (N, V)
    operand, which this tally ignores. On the CPU our loss's backward scales the softmax by row
    blocks that stay in cache (a read of the softmax and a write of the gradient, which the tally
    misses); on CUDA it is a copy and one in-place product, both counted.
    """

    SPARSE = {"gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "index_select", "index_put", "index_put_",
              "nll_loss_forward"}
    WRITE_ONLY = {"nll_loss_backward"}  # takes the (N, V) log-probs for their shape, writes a dense gradient
    METADATA = {"new_zeros", "new_empty", "new_full", "new_ones",  # read only dtype and device of self
                "empty_like", "empty", "empty_strided"}  # allocate, write nothing

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape, self.total, self.by_op = tuple(shape), 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self.SPARSE or name in self.METADATA:
            return out

        def big(tree):
            return {t.data_ptr(): t.numel() * t.element_size() for t in pytree.tree_leaves(tree)
                    if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape}

        n = (0 if name in self.WRITE_ONLY else sum(big((args, kwargs)).values())) + sum(big(out).values())
        if n:
            self.total += n
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192, help="N: one probe chunk (8 x 1,024 by default)")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loss-only", action="store_true",
                    help="skip the head+loss cases (CPU bf16 matrix products are too slow to be informative)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n, v, d = args.tokens, args.vocab, args.width
    w_head = (torch.randn(v, d, generator=g) * 0.02).to(dev)
    h = (torch.randn(n, d, generator=g) * 4).to(dev)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    t[:: 17] = -100  # some ignored positions, as padding gives
    scale = torch.full((n,), 1.0 / 1024, device=dev)  # d(mean over a 1,024-token sequence)/d(token loss)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16)

    def head_nograd():
        with torch.no_grad(), autocast():
            return F.linear(h, w_head)

    def with_loss(loss_fn):
        def run():
            x = h.detach().requires_grad_()
            with autocast():
                loss = loss_fn(F.linear(x, w_head), t)
                return loss.detach(), torch.autograd.grad((loss * scale).sum(), x)[0]
        return run

    def loss_only(loss_fn):
        z0 = head_nograd()

        def run():
            z = z0.detach().requires_grad_()
            with autocast():
                loss = loss_fn(z, t)
                return loss.detach(), torch.autograd.grad((loss * scale).sum(), z)[0]
        return run

    def torch_ce_fn(z, y):
        return F.cross_entropy(z, y, reduction="none")

    def ours_fn(z, y):
        return token_cross_entropy(z, y, method="recompute")

    cases = {"head_nograd": head_nograd}
    if not args.loss_only:
        cases.update(torch_ce=with_loss(torch_ce_fn), ours=with_loss(ours_fn))
    cases.update(torch_ce_loss_only=loss_only(torch_ce_fn), ours_loss_only=loss_only(ours_fn))

    # float64 reference on the same bf16 logits
    with torch.no_grad(), autocast():
        logits = F.linear(h, w_head)
    zd = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(zd, t, reduction="none")
    ref_dz = torch.autograd.grad((ref_loss * scale.double()).sum(), zd)[0]
    ref_dh = ref_dz @ w_head.to(torch.bfloat16).double()
    del zd, logits

    rows = []
    for label, fn in cases.items():
        spy = VocabBytes((n, v))
        with spy:
            fn()
        seconds, peak, out = measure(fn, dev, args.repeats)
        row = {"case": label, "seconds": seconds, "peak_bytes": peak, "vocab_bytes": spy.total, "by_op": spy.by_op}
        if label != "head_nograd":
            loss, dh = out
            row["loss_err"] = float((loss.double() - ref_loss.detach()).abs().max())
            ref = ref_dh if dh.shape == ref_dh.shape else ref_dz
            row["dh_rel_err"] = float((dh.double() - ref).norm() / ref.norm())
        rows.append(row)
    base = rows[0]["seconds"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\n### Loss + head input gradient ({name}, torch {torch.__version__}, N={n}, V={v}, d={d}, bf16 autocast)\n")
    print("| case | seconds | vs head no-grad | (N x V) bytes | peak GiB | loss err | grad rel. err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        le = f"{r['loss_err']:.1e}" if "loss_err" in r else "-"
        de = f"{r['dh_rel_err']:.1e}" if "dh_rel_err" in r else "-"
        print(f"| {r['case']} | {r['seconds']:.4f} | {r['seconds'] / base:.2f}x | {r['vocab_bytes'] / 2**30:.2f} GiB "
              f"| {peak} | {le} | {de} |")
    by = {r["case"]: r for r in rows}
    for a, b in (("ours", "torch_ce"), ("ours_loss_only", "torch_ce_loss_only")):
        if a in by:
            print(f"\n{a} / {b}: time {by[a]['seconds'] / by[b]['seconds']:.2f}, "
                  f"(N x V) bytes {by[a]['vocab_bytes'] / by[b]['vocab_bytes']:.2f}")
    for r in rows[1:]:
        print(f"{r['case']}: " + ", ".join(f"{k} {b / 2**30:.2f}" for k, b in sorted(r["by_op"].items(), key=lambda kv: -kv[1])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": name, "torch": torch.__version__, "tokens": n, "vocab": v, "width": d}
        write_json_atomic(out, {"meta": meta, "rows": rows})
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

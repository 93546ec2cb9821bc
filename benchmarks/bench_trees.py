"""Hot paths of two checkouts, old vs new, timed interleaved in one run (CPU, 2 threads).

Run:  python benchmarks/bench_trees.py OLD_TREE NEW_TREE [--pairs 15] [--out trees.json]

Each tree is imported in its own long-lived subprocess (``PYTHONPATH=TREE``); the driver asks them in
turn, old then new, for one timing of one case (ABAB), ``--pairs`` times per case, and reports per
case the median seconds per call of each tree and the median and interquartile range of the per-pair
ratios new / old. A regression is a ratio median > 1.05 whose IQR excludes 1.0. Interleaving and
per-pair ratios are what see through a shared machine's load. The issue-13 CPU ratios (a 1,024-row
``update`` over a bare ``X.T @ X`` of the same rows, same worker, same round) are reported per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, os, sys, tempfile, time, warnings
import torch
import torch.nn as nn
import torch.nn.functional as F
torch.set_num_threads(2)
torch.manual_seed(0)
import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator, PerSampleGradientProbe, Schedule
from spectral_lens.capture import select_modules
from spectral_lens.atomic import write_text_atomic
from spectral_lens.activation_capture import attach
warnings.simplefilter("ignore")


class Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.c_attn, self.c_proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, 2))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), Attn(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, d=64, heads=4, layers=2, ctx=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(3, 0.1, d) + 5.0


CASES = {}
SIZES = [(1024, 256), (1024, 768), (4096, 768), (32768, 256)]
for n, d in SIZES:
    x = rows(n, d, d)
    L = 128
    mask = (torch.arange(L) < L * 3 // 4).repeat(n // L)  # padding: the last quarter of each sequence
    CASES[f"bare XtX {n}x{d}"] = (lambda x=x: x.t() @ x, 1)
    for prec in ("exact", "fast"):
        for masked in (False, True):
            acc = ActivationCovarianceAccumulator(d, precision=prec)
            m = mask if masked else None
            CASES[f"update {prec} {n}x{d}{' masked' if masked else ''}"] = (lambda acc=acc, x=x, m=m: acc.update(x, m), 1)

model = GPT()
idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
cap = attach(model, "h.*")
def lens_forward():
    with torch.no_grad():
        model(idx)
CASES["lens forward, hooks on 2 blocks"] = (lens_forward, 1)

pmodel = GPT()
pbatch = (idx, torch.roll(idx, -1, 1))
probe = PerSampleGradientProbe(pmodel, "h.1.attn.c_proj.weight", engine="fast")
probe.update(pbatch)
def probe_update():
    probe.reset()
    probe.update(pbatch)
CASES["probe update (fast) M=8"] = (probe_update, 1)

sched = Schedule.every(10)
def contains():
    for s in range(1000):
        s in sched
CASES["Schedule __contains__ x1000"] = (contains, 1)

big = GPT(vocab=32, d=16, heads=2, layers=48, ctx=8)
CASES["select_modules 48 blocks glob"] = (lambda: select_modules(big, "h.*.attn"), 1)

tmp = tempfile.mkdtemp(prefix="bench_trees_")
path = os.path.join(tmp, "f.txt")
CASES["write_text_atomic 100 B"] = (lambda: write_text_atomic(path, "x" * 100), 1)

for name, (fn, _) in CASES.items():  # warm-up
    for _ in range(3):
        fn()
print(json.dumps({"ready": sl.__file__, "cases": list(CASES)}), flush=True)
for line in sys.stdin:
    name, per = line.rstrip("\n").rsplit(" ", 1)
    fn = CASES[name][0]
    t = time.perf_counter()
    for _ in range(int(per)):
        fn()
    print(json.dumps((time.perf_counter() - t) / int(per)), flush=True)
'''

PER = {"update": 5, "bare": 5, "lens": 10, "probe": 5, "Schedule": 5, "select_modules": 10, "write_text_atomic": 20}


def start(tree: str) -> tuple[subprocess.Popen, list[str]]:
    # passive OpenMP waits: a worker that just finished must not spin on the cores the other one is timed on.
    # Nor SciPy's OpenBLAS pool (the CPU syrk, >= 8,192 rows), whose threads spin ~0.1 s after each call unless
    # their timeout is 2^4 cycles: that spin made the second tree of each pair 1.16x slower on the first syrk
    # case after a non-syrk one (32,768 x 256 exact, same tree on both sides; review 28)
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE",
               OPENBLAS_THREAD_TIMEOUT="4")
    p = subprocess.Popen([sys.executable, "-c", WORKER], cwd=tree, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    hello = json.loads(p.stdout.readline())
    assert hello["ready"].startswith(os.path.abspath(tree)), (tree, hello["ready"])
    return p, hello["cases"]


def ask(p: subprocess.Popen, case: str, per: int) -> float:
    p.stdin.write(f"{case} {per}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def quartiles(v):
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="+", default=None, help="only cases whose name contains one of these")
    args = ap.parse_args()
    load0 = os.getloadavg()
    (po, cases), (pn, _) = start(args.old), start(args.new)
    if args.only:
        cases = [c for c in cases if any(o in c for o in args.only)]
    times = {c: {"old": [], "new": []} for c in cases}
    for _ in range(args.pairs):
        for c in cases:
            per = PER[c.split()[0]]
            times[c]["old"].append(ask(po, c, per))
            times[c]["new"].append(ask(pn, c, per))
    po.stdin.close(), pn.stdin.close()
    po.wait(), pn.wait()
    load1 = os.getloadavg()
    out = {"load_start": load0, "load_end": load1, "pairs": args.pairs, "cases": []}
    print(f"load average at start {load0[0]:.2f} / end {load1[0]:.2f}; {args.pairs} ABAB pairs, 2 threads")
    print(f"{'case':40s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s} {'IQR':>13s}  verdict")
    for c in cases:
        o, n = times[c]["old"], times[c]["new"]
        r = [b / a for a, b in zip(o, n)]
        q1, med, q3 = quartiles(r)
        verdict = "REGRESSION" if med > 1.05 and q1 > 1.0 else ("faster" if med < 0.95 and q3 < 1.0 else "-")
        row = {"case": c, "old_s": statistics.median(o), "new_s": statistics.median(n), "ratio": med,
               "iqr": [q1, q3], "verdict": verdict}
        out["cases"].append(row)
        print(f"{c:40s} {row['old_s'] * 1e3:9.4f} {row['new_s'] * 1e3:9.4f} {med:8.3f} [{q1:.3f}, {q3:.3f}]  {verdict}")
    print("issue 13 CPU ratios (1,024-row update / bare X.T @ X, same round): targets <= 1.5x (d=256), <= 1.1x (d=768)")
    for tree in ("old", "new"):
        for c in cases:
            if c.startswith("update") and c.split()[2].startswith("1024x") and "masked" not in c:
                bare = "bare XtX " + c.split()[2]
                if bare not in times:
                    continue
                r = [u / b for u, b in zip(times[c][tree], times[bare][tree])]
                q1, med, q3 = quartiles(r)
                out.setdefault("issue13", []).append({"tree": tree, "case": c, "ratio": med, "iqr": [q1, q3]})
                print(f"  {tree}: {c:28s} {med:.2f}x  [{q1:.2f}, {q3:.2f}]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

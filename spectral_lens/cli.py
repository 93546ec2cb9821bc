"""The ``spectral-lens`` command line: ``report``, ``predict`` and ``inspect``.

Examples::

    spectral-lens report runs/sweep --out report/ --format html --target-loss 3.2
    spectral-lens report runs/a runs/b --out r/ --target-loss 3.2 --transition a:b
    spectral-lens predict runs/sweep --target-loss 3.2
    spectral-lens inspect runs/sweep/toy-b4/spectra/00000763_act_blocks.11.npz --window 10 40
    spectral-lens inspect runs/sweep/toy-b4

A RUN_DIR may be a run directory or a directory of run directories (a sweep root). Errors in the
input (bad arguments, missing or corrupted records, unknown spectrum names) print one line
``spectral-lens COMMAND: error: ...`` on stderr and exit with status 2. A malformed line in a run's
``log.jsonl`` or ``measurements.jsonl`` costs that line only: it is skipped with one warning line
naming the file and line (``--strict`` refuses the run instead). A reader that goes away
(``spectral-lens inspect RUN | head``) ends the command quietly with status 141; Ctrl-C ends it with
one line ``spectral-lens COMMAND: interrupted`` and status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line ``PROG: error: ...`` (exit status 2), without
    the usage block; its subparsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _window(values):
    if values is None:
        return None
    lo, hi = values
    return (lo, hi)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction of the token budget in (0, 1], got {text!r}")
    return value


def _check_window(parser: argparse.ArgumentParser, args) -> None:
    """``--window LO HI`` must be 1-based ranks with LO < HI (argparse checks each is an int)."""
    window = getattr(args, "window", None)
    if window is not None and not 1 <= window[0] < window[1]:
        parser.exit(2, f"{parser.prog} {args.command}: error: argument --window: expected 1-based ranks "
                       f"LO < HI, got {window[0]} {window[1]}\n")


def _readings(text: str) -> list[tuple[str, str]]:
    """Every ``(RUN_A, RUN_B)`` that ``text`` splits into at one of its ``:`` (a run id may hold a ``:``
    itself), both sides non-empty."""
    return [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == ":" and 0 < i < len(text) - 1]


def _transition(text: str) -> str:
    """``--transition RUN_A:RUN_B``, checked for its form here; which ``:`` splits it is decided once the runs
    are open (:func:`_split_transition`)."""
    readings = _readings(text)
    if not readings:
        raise argparse.ArgumentTypeError(f"transition must be RUN_A:RUN_B (run ids), got {text!r}")
    if all(a == b for a, b in readings):  # every difference zero: a run's change labelled against itself
        raise argparse.ArgumentTypeError(f"transition must name two different runs, got {text!r}")
    return text


def _split_transition(text: str, run_ids) -> tuple[str, str]:
    """``--transition`` ``text`` as ``(RUN_A, RUN_B)``: split at the one ``:`` that leaves two different known
    run ids (``exp:1:exp:2`` with runs ``exp:1`` and ``exp:2``; ``a:b`` split at its first ``:`` was
    ``('a', 'b:c')`` for ``a:b:c`` whatever the runs were called). Two such splits: ``ValueError`` naming both
    readings. None: a single ``:`` reading is returned (the report names its unknown id), else ``ValueError``."""
    readings = [(a, b) for a, b in _readings(text) if a != b]
    known = [(a, b) for a, b in readings if a in run_ids and b in run_ids]
    if len(known) == 1:
        return known[0]
    if known:
        both = " or ".join(f"{a!r} -> {b!r}" for a, b in known)
        raise ValueError(f"--transition {text!r} is ambiguous: it reads as {both}, each a pair of these runs' ids "
                         "(rename a run, or call spectral_lens.report.build_report(transitions=[(RUN_A, RUN_B)]))")
    if len(readings) == 1:
        return readings[0]
    same = [a for a, b in _readings(text) if a == b and a in run_ids]  # as --transition a:a is refused
    if same:
        raise ValueError(f"--transition {text!r} names run {same[0]!r} twice: a transition must name two "
                         "different runs")
    raise ValueError(f"--transition {text!r}: no ':' in it splits it into two run ids of these runs (expected "
                     f"RUN_A:RUN_B); run ids: {sorted(run_ids)}")


def _out_dir(text: str) -> str:
    """``--out``: an empty value (an unset shell variable) would be the current directory, where the
    report replaces report.md and removes figure files such as loss.png: refused; so is an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected an output directory, got {text!r}")
    # os.path, not Path: a name that cannot be stat()ed (too long) is False here, and the report's mkdir
    # names it; an OSError out of an argparse type function would be a traceback
    if os.path.exists(text) and not os.path.isdir(text):  # was the bare "FILE: File exists" of mkdir
        raise argparse.ArgumentTypeError(f"expected an output directory, got {text!r}, an existing file")
    for p in (text, *map(str, Path(text).parents)):  # a dangling link, as mkdir says it: "File exists"
        if os.path.islink(p) and not os.path.exists(p):
            raise argparse.ArgumentTypeError(f"expected an output directory, got {text!r}: {p!r} is a symbolic "
                                             "link to a path that does not exist")
    return text


def _path(text: str) -> str:
    """A RUN_DIR or FILE_OR_RUN_DIR: an empty value (an unset shell variable, ``"$RUNS"``) would be the
    current directory, read in its place without a word: refused, and so is a name of spaces that does
    not exist (one that exists, however odd, is not the current directory)."""
    if not text.strip() and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _target_loss(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite validation loss > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``spectral-lens`` (exposed for documentation and tests)."""
    from . import __version__

    parser = _Parser(
        prog="spectral-lens",
        description="Reports, early batch-tier prediction and inspection of spectral-lens run records.",
        epilog="examples:\n"
               "  spectral-lens inspect runs/mine-b8\n"
               "  spectral-lens predict runs/ --target-loss 3.2\n"
               "  spectral-lens report runs/ --out report/ --target-loss 3.2\n"
               "'spectral-lens COMMAND --help' lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's lines as written
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def early_args(p):
        p.add_argument("--fraction", type=_fraction, default=0.2, help="early checkpoint, fraction of the token budget (default 0.2)")
        p.add_argument("--window", type=int, nargs=2, metavar=("LO", "HI"),
                       help="rank window of alpha_tail (default: the tail window each run recorded in its run.json; "
                            "the runs of a family must agree)")
        p.add_argument("--spectrum", help="spectrum name, e.g. act:transformer.h.11, as the inspect command lists "
                                          "them (default: each run's primary / only activation spectrum)")
        p.add_argument("--target-loss", type=_target_loss,
                       help="target validation loss for tokens-to-target and eps_tok (finite, > 0)")
        strict_arg(p)

    def strict_arg(p):
        p.add_argument("--strict", action="store_true",
                       help="refuse a run with a malformed record line (default: skip the line with a warning); "
                            "a truncated last line, a write in progress, is skipped either way")

    run_dirs_help = "run directories (each holds a run.json), or folders of them such as a sweep root"
    rp = sub.add_parser("report", help="write a Markdown or HTML report (figures need matplotlib: the plot extra)")
    rp.add_argument("runs", nargs="+", type=_path, metavar="RUN_DIR", help=run_dirs_help)
    rp.add_argument("--out", type=_out_dir, required=True, help="output directory")
    rp.add_argument("--format", choices=("md", "html"), default="md",
                    help="report.md with PNG files beside it (default), or report.html with the figures embedded")
    rp.add_argument("--transition", type=_transition, action="append", default=[], metavar="RUN_A:RUN_B",
                    help="classify a transition between two runs, named by run id (RunInfo.run_id, not a "
                         "directory); a run id may hold ':' (the ':' that leaves two known run ids splits it); "
                         "repeatable; needs --target-loss")
    rp.add_argument("--replicates", nargs="+", type=_path, default=[], metavar="RUN_DIR",
                    help="runs of one configuration that differ only in the seed: the taxonomy's thresholds "
                         "become twice their largest seed-to-seed difference (needs --target-loss)")
    rp.add_argument("--no-plots", action="store_true", help="tables only")
    early_args(rp)

    pp = sub.add_parser("predict", help="rank batch tiers by the early tail exponent")
    pp.add_argument("runs", nargs="+", type=_path, metavar="RUN_DIR", help=run_dirs_help)
    pp.add_argument("--json", action="store_true", help="machine-readable output (strict JSON: an undefined value is null)")
    early_args(pp)

    ip = sub.add_parser("inspect", help="summarize a spectrum .npz file or a run directory")
    ip.add_argument("path", type=_path, metavar="FILE_OR_RUN_DIR", help="a spectrum .npz file or a run directory")
    ip.add_argument("--window", type=int, nargs=2, metavar=("LO", "HI"),
                    help="rank window of alpha_tail for a spectrum file, compared with its crossover rank r* "
                         "(default: the tail window predict uses for the run the file belongs to, from its "
                         "run.json; else [100, 200])")
    strict_arg(ip)
    return parser


def _open(paths, args) -> list:
    """The runs of ``paths`` (sweep roots expanded); a malformed record line is skipped with a
    warning unless ``--strict``."""
    from .records import open_runs

    return open_runs(paths, errors="raise" if args.strict else "skip")


def _cmd_report(args) -> int:
    from .report import build_report

    runs = _open(args.runs, args)
    replicates = _open(args.replicates, args) if args.replicates else []
    if args.spectrum is not None:  # a typo is the user's error, as in predict, not a note in a written report
        known = sorted({name for r in runs for name in r.spectrum_names()})
        if args.spectrum not in known:
            raise ValueError(f"--spectrum {args.spectrum!r}: no run records it; recorded spectra: {known}")
    ids = {r.run_id for r in runs}
    transitions = [_split_transition(t, ids) for t in args.transition]
    rep = build_report(
        runs, args.out, fmt=args.format, target_loss=args.target_loss, fraction=args.fraction,
        window=_window(args.window), spectrum=args.spectrum, transitions=transitions, replicates=replicates,
        plots=not args.no_plots,
    )
    print(f"wrote {rep.path}" + (f" and {len(rep.figures)} figures" if rep.figures else ""))
    for f in rep.flags:
        print(f"caution: {f}")
    for n in rep.notes:
        print(f"note: {n}")
    return 0


def _strict_json(obj):
    """``obj`` with every non-finite float (an undefined rho or sigma: NaN) as ``None``, so ``--json``
    prints strict JSON (``null``) that any parser reads, not Python's ``NaN`` token."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _fmt(v: float, spec: str = ".4f") -> str:
    """``v`` formatted by ``spec``, ``"nan"`` for an undefined value, and without the sign of a value that
    rounds to zero (a flat spectrum's alpha is ``-0.0``: ``"-0.0000"`` read as a negative exponent), a NumPy
    float32 included, and a huge value in the ``"g"`` form (``1e+300``, not 300 digits): ``report._plain``."""
    from .report import _as_float, _plain

    v = _as_float(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return _plain(v, spec)


def _unranked(rk) -> str | None:
    """Why a family's tiers are not a ranking (one tier: its P(best) = 1 is trivially true), or None."""
    if len(rk.tiers) > 1:
        return None
    return f"one tier ({rk.recommended:g}): nothing to rank"


def _realized(pred, target_loss: float) -> dict[str, tuple[float, float, str]]:
    """Run id -> ``(T, eps_tok, target)`` of the ranked runs: tokens to ``target_loss`` (NaN when not
    reached), ``eps_tok`` as the score computes it (a tier's best learning rate; NaN when unknown,
    ``inf`` when the run ended above the target), and ``"reached"`` or the report's not-reached wording
    (``"not reached"``, ``"not reached yet"``, ``"not reached (failed)"``). The realized answer the
    prediction is checked against; the prediction itself is not changed."""
    from .analysis.efficiency import pick_learning_rates, token_inefficiency, tokens_to_target
    from .report import _target_cell

    with warnings.catch_warnings():  # the score just computed the same eps_tok and showed its warnings
        warnings.simplefilter("ignore")
        eps = token_inefficiency(pick_learning_rates(pred.runs_)[0], target_loss)
    out = {}
    for r in pred.runs_:
        T = tokens_to_target(r, target_loss)
        out[r.run_id] = (T if math.isfinite(T) else math.nan, eps.get(r.run_id, math.nan),
                         "reached" if math.isfinite(T) else _target_cell(r, T))
    return out


def _eps_status(v: float) -> str:
    """``predict --json``'s word for an ``eps_tok`` that strict JSON writes as a number or ``null``:
    ``"known"`` (a number), ``"not reached"`` (``inf``: the run ended or diverged above the target and
    ranks last in the score) or ``"unknown"`` (NaN: cut short or still going, or no run of its family
    reached the target; the score leaves it out). Both non-finite values are ``null`` in ``"eps_tok"``."""
    return "known" if math.isfinite(v) else "not reached" if v == math.inf else "unknown"


def _eps_cell(v: float) -> str:
    return _fmt(v, ".3f") if math.isfinite(v) else _eps_status(v)


def _predict_key(pred, target_loss, scored: bool) -> list[str]:
    """``predict``'s key under its tables: what each number means and which way is better, for a reader who
    has not read the protocol, in short lines (a key longer than the tables buries them). The spectrum is
    named, not assumed to be an activation one (``--spectrum`` may pick a gradient spectrum)."""
    from .analysis.efficiency import percent

    fams: dict[str, set] = {}
    for s in pred.statistics_:
        if s.window is not None:
            fams.setdefault(s.family, set()).add(f"{s.spectrum}, ranks {s.window[0]}-{s.window[1]}")
    said = {f: ", ".join(sorted(w)) for f, w in fams.items()}
    where = (next(iter(said.values())) if len(set(said.values())) == 1
             else "; ".join(f"{w} in family {f}" for f, w in said.items()))
    out = [f"key: alpha_tail = tail power-law exponent ({where}) at {percent(pred.fraction)} of each run's token "
           "budget; smaller predicts fewer tokens: rank 1",
           "key: sigma = its uncertainty; P(best) = the probability, given the sigmas, that the tier has the "
           "smallest alpha_tail"]
    if target_loss is not None:
        out += [f"key: T = tokens at the first evaluation with val loss <= {target_loss:.10g}; eps_tok = T / the "
                "smallest T of the family (1.000 = fewest tokens)",
                "key: 'not reached' = ended or diverged above the target (ranks last); 'unknown' = cut short, still "
                "running or none of the family reached it (left out)"]
    if scored:
        out.append("key: Spearman rho: +1 = alpha_tail ordered the runs as eps_tok did; p = the chance of such a rho "
                   "if unrelated; n = runs with a known eps_tok")
    return out


def _cmd_predict(args) -> int:
    from .analysis.efficiency import learning_rate
    from .analysis.tail import TailPredictor
    from .report import ranking_flags, score_flags, sweep_notes, target_flags

    runs = _open(args.runs, args)
    notes: list[str] = []  # runs left out (diverged, cut short) and runs of a family that differ: one line each
    with sweep_notes(notes):
        pred = TailPredictor(args.fraction, window=_window(args.window), spectrum=args.spectrum).fit(runs)
        rankings = pred.predict()
        score = pred.score(targets=args.target_loss) if args.target_loss is not None else None
        realized = _realized(pred, args.target_loss) if args.target_loss is not None else None
    cautions = [] if score is None else (score_flags(score) + target_flags(
        [r for r in pred.runs_ if r.run_id in {p[0] for p in score.points}], args.target_loss))
    if args.json:
        by_id = {r.run_id: r for r in pred.runs_}
        out = {
            "fraction": args.fraction,
            "excluded": dict(pred.excluded_),
            "notes": notes,
            "families": {
                f: {
                    "recommended": rk.recommended,
                    "p_recommended": rk.p_recommended,
                    "ranked": len(rk.tiers) > 1,
                    "note": _unranked(rk),
                    "cautions": ranking_flags({f: rk}),
                    "tiers": [
                        {"tier": t, "alpha_tail": rk.values[t], "sigma": rk.sigmas[t], "p_best": rk.p_best[t],
                         "runs": list(rk.run_ids[t]), "lr": learning_rate(by_id[rk.run_ids[t][0]]),
                         **({} if realized is None else {
                             "tokens_to_target": [realized[rid][0] for rid in rk.run_ids[t]],
                             "eps_tok": [realized[rid][1] for rid in rk.run_ids[t]],
                             "eps_tok_status": [_eps_status(realized[rid][1]) for rid in rk.run_ids[t]],
                             "target_status": [realized[rid][2] for rid in rk.run_ids[t]]})}
                        for t in rk.tiers
                    ],
                }
                for f, rk in rankings.items()
            },
        }
        if args.target_loss is not None:
            out["target_loss"] = args.target_loss
        if score is not None:
            out["score"] = {"rho": score.rho, "pvalue": score.pvalue, "n": score.n,
                            "within": {f: {"rho": w.rho, "pvalue": w.pvalue, "n": w.n} for f, w in score.within.items()},
                            "cautions": cautions}
        print(json.dumps(_strict_json(out), indent=2, allow_nan=False))
        return 0
    for f, rk in rankings.items():
        unranked = _unranked(rk)
        print(f"family {f}: {unranked}" if unranked else
              f"family {f}: recommended tier {rk.recommended:g} (P(best) = {_fmt(rk.p_recommended, '.2f')})")
        extra = "" if realized is None else f"  {'T (tokens to target)':>20}  {'eps_tok':>11}"
        print(f"  {'rank':>4}  {'tier':>6}  {'alpha_tail':>10}  {'sigma':>8}  {'P(best)':>7}{extra}  runs")
        for i, t in enumerate(rk.tiers, 1):
            if realized is not None:  # realized answer, one value per run of the tier (seeds), as the runs column
                cells = [realized[rid] for rid in rk.run_ids[t]]
                extra = (f"  {', '.join(c[2] if c[2] != 'reached' else f'{c[0]:.4g}' for c in cells):>20}"
                         f"  {', '.join(_eps_cell(c[1]) for c in cells):>11}")
            print(f"  {i:>4}  {t:>6g}  {_fmt(rk.values[t]):>10}  {_fmt(rk.sigmas[t], '.2g'):>8}  "
                  f"{_fmt(rk.p_best[t], '.3f'):>7}{extra}  {', '.join(rk.run_ids[t])}")
        for c in ranking_flags({f: rk}):
            print(f"caution: {c}")
    for line in _predict_key(pred, args.target_loss, score is not None):
        print(line)
    if score is not None:
        for f, w in score.within.items():
            print(f"Spearman rho (early alpha_tail vs eps_tok), {f}: {_fmt(w.rho, '.3f')} (p = {_fmt(w.pvalue, '.3g')}, n = {w.n})")
        if len(score.within) > 1:
            print(f"pooled (per-family min-max normalized): {_fmt(score.rho, '.3f')} "
                  f"(p = {_fmt(score.pvalue, '.3g')}, n = {score.n})")
        for c in cautions:
            print(f"caution: {c}")
    for n in notes:
        print(f"note: {n}")
    return 0


_NOT_IN_RUN = "the d12 window; the file is not in a run directory"


def _spectrum_windows(path: Path, window) -> tuple[tuple[int, int], tuple[int, int], str, str | None]:
    """The ``(tail, head)`` windows ``inspect FILE.npz`` fits, where the tail one came from, in words, and
    why the run's recorded head window is not the head one (``None`` when it is, or none is recorded).

    A spectrum file carries no window: ``--window`` if given, else the run the file belongs to
    (``RUN/spectra/FILE.npz`` or ``RUN/FILE.npz``, not ``RUN/OTHER/FILE.npz``) decides as ``predict`` does
    (its recorded tail window, else the scale rule for its ``n_layer``), else the d12 window ``[100, 200]``. The head window is the
    run's recorded one, else ``[10, 40]`` (a recorded one that is not 1-based ranks LO < HI is said, as the
    tail one is: the taxonomy stops on it). A run.json that cannot be read is named, not fatal: the
    file itself is what the user asked about."""
    from .analysis.windows import DEFAULT_WINDOW
    from .records import RunRecord
    from .records.schema import SPECTRA_DIR
    from .spectra.fit import tail_window

    head, tail, source, head_note = (10, 40), DEFAULT_WINDOW, _NOT_IN_RUN, None
    # "x.npz" run from inside RUN/spectra: its parents are "." without absolute(); normpath: the parent of
    # RUN/spectra/sub/../x.npz is RUN/spectra, not "sub/.." (whose name is "..")
    here = Path(os.path.normpath(path.absolute()))
    # RUN/spectra/FILE.npz (where a RunWriter puts it) or RUN/FILE.npz; not RUN/OTHER/FILE.npz, a file
    # kept inside a run that need not be its own
    homes = (here.parent, here.parent.parent) if here.parent.name == SPECTRA_DIR else (here.parent,)
    run_dir = next((d for d in homes if (d / "run.json").is_file()), None)
    if run_dir is not None:
        run_json = run_dir / "run.json"
        try:
            header = RunRecord._read_header(run_dir)
            windows = header.get("summary_windows") or {}
            ok = {k: w for k, w in windows.items() if w and 1 <= w[0] < w[1]}  # the reader checks types only
            if ok.get("head"):
                head = tuple(ok["head"])
            elif windows.get("head"):
                head_note = f"{run_json} records head window {list(windows['head'])}, not 1-based ranks LO < HI"
            if ok.get("tail"):
                tail, source = tuple(ok["tail"]), f"recorded in {run_json}"
            elif windows.get("tail"):
                source = f"the d12 window; {run_json} records tail window {list(windows['tail'])}, not 1-based ranks LO < HI"
            else:  # n_layer through RunInfo's checks, as predict reads it (10**400 is beyond floats: refused)
                n_layer = RunRecord._read_info(run_dir).n_layer
                if isinstance(n_layer, int) and not isinstance(n_layer, bool) and n_layer >= 1:
                    tail, source = tail_window(n_layer), f"scale rule for n_layer {n_layer} in {run_json}, which records no tail window"
                else:
                    source = f"the d12 window; {run_json} records no tail window and no usable n_layer"
        except (ValueError, OSError) as exc:
            source = f"the d12 window; {run_json} cannot be read: {_user_error(exc)}"
    if window is not None:
        tail, source = tuple(window), "--window"
    elif not source.startswith("recorded"):
        source += "; --window LO HI to choose"
    return (int(tail[0]), int(tail[1])), (int(head[0]), int(head[1])), source, head_note


def _inspect_spectrum(path: Path, window=None) -> None:
    from .spectrum import Spectrum
    from .summaries import RankMe, crossover_rank, participation_ratio, stable_rank
    from .records import spectrum_summaries

    tail, head, source, head_note = _spectrum_windows(path, window)
    s = Spectrum.load(path)
    v = s.values
    print(f"{path}: {s.kind} spectrum")
    print(f"  source: {s.source}   dim: {s.dim}   n_rows: {s.n_rows}   nonzero: {s.n_nonzero}")
    print(f"  top eigenvalues: {', '.join(_fmt(x, '.4g') for x in v[:5].tolist())}")
    print(f"  trace: {_fmt(float(v.sum()), '.6g')}")
    if s.n_nonzero:
        print(f"  RankMe: {_fmt(RankMe()(s), '.4g')}   participation ratio: {_fmt(participation_ratio(s), '.4g')}   "
              f"stable rank: {_fmt(stable_rank(s), '.4g')}")
        summ = spectrum_summaries(s, tail=tail, head=head)
        # the d12 default for a file outside a run, on a short spectrum: nothing to say about it; a run.json
        # that cannot be read or records a bad window is said whether or not the window fits
        chosen = window is not None or not source.startswith(_NOT_IN_RUN)
        if "alpha_tail" in summ or chosen:
            print(f"  tail window: ranks [{tail[0]}, {tail[1]}] ({source})")
        if head_note is not None:  # was the default [10, 40] without a word
            print(f"  head window: ranks [{head[0]}, {head[1]}] (the default; {head_note})")
        for key, win in (("alpha_head", head), ("alpha_tail", tail)):
            if key in summ:
                print(f"  {key} [{win[0]}, {win[1]}]: {_fmt(summ[key])} (r2 {_fmt(summ[key + '_r2'], '.3f')})")
            elif key == "alpha_tail" and chosen:
                print(f"  {key} [{win[0]}, {win[1]}]: not fitted (the window does not fit this spectrum: "
                      f"{s.n_nonzero} nonzero eigenvalues, {s.n_rows} rows)")
        if s.n_nonzero >= 9:
            try:
                c = crossover_rank(s)
                if c.located:  # the tail window must start beyond r* (Prop. 9), else its alpha mixes in the head
                    win = f"the alpha_tail window [{tail[0]}, {tail[1]}]"
                    where = "" if "alpha_tail" not in summ else (
                        f"; {win} starts beyond it" if c.rank < tail[0] else
                        f"; {win} starts before it (in the head: it underestimates the tail exponent)")
                    print(f"  crossover rank r*: {c.rank:.1f} (head alpha {_fmt(c.head_alpha, '.3f')}, tail alpha "
                          f"{_fmt(c.tail_alpha, '.3f')}){where}")
                else:
                    print(f"  crossover rank r*: not located within ranks {c.ranks[0]}-{c.ranks[1]}")
            except ValueError:
                pass
    if s.metadata:
        print(f"  metadata: {json.dumps(s.metadata)[:300]}")


def _windows_text(run) -> str:
    """``run.json`` ``summary_windows`` in words: the ranks the stored ``alpha_tail`` / ``alpha_head``
    were fitted on (a run without ``alpha_tail`` shows which window did not fit; one that is not LO < HI is
    said, with the command that stops on it), and for a run that
    recorded no tail window, the one ``predict`` and ``report`` use instead."""
    from .analysis.windows import DEFAULT_WINDOW
    from .spectra.fit import tail_window

    windows = run.summary_windows or {}
    stops = {"tail": "predict and report stop on it", "head": "a report's --transition stops on it"}
    parts = [f"{key} ranks {list(windows[key])}" + ("" if 1 <= windows[key][0] < windows[key][1] else
                                                     f" (not 1-based ranks LO < HI: {stops[key]})")
             for key in ("tail", "head") if windows.get(key)]
    text = ", ".join(parts) + " (run.json)" if parts else "none recorded in run.json"
    if not windows.get("tail"):
        n_layer = run.info.n_layer
        try:  # a malformed n_layer (< 1) is said here, not an error that hides the rest of inspect
            rule = list(tail_window(int(n_layer))) if n_layer else None
        except ValueError:
            return text + (f"; predict and report stop on it: n_layer {n_layer} in run.json is not a depth (>= 1) "
                           "for the scale rule (pass --window LO HI)")
        text += (f"; predict and report use tail ranks {rule} (scale rule for n_layer {n_layer})" if rule else
                 f"; predict and report use tail ranks {list(DEFAULT_WINDOW)} (n_layer unknown: the d12 window)")
    return text


def _inspect_run(path: Path, strict: bool) -> None:
    from .records import RunRecord

    r = RunRecord.open(path, errors="raise" if strict else "skip")
    i = r.info
    print(f"{path}: run {i.run_id!r}")
    print(f"  family: {i.family}   batch tier: {i.batch_tier}   tokens/step: {i.tokens_per_step}   seed: {i.seed}")
    print(f"  n_layer: {i.n_layer}   total tokens: {i.total_tokens}   primary spectrum: {i.primary_spectrum}")
    print(f"  summary windows: {_windows_text(r)}")
    if i.extras:
        print(f"  extras: {json.dumps(i.extras)[:300]}")
    print(f"  events: {len(r.events)}   measurements: {len(r.measurements)}")
    tokens, losses = r.val_curve()
    if losses.size:
        k = int(losses.argmin())
        print(f"  val loss: first {_fmt(losses[0], '.4g')} at {tokens[0]:.4g} tokens, last {_fmt(losses[-1], '.4g')} "
              f"at {tokens[-1]:.4g}, min {_fmt(losses[k], '.4g')} at {tokens[k]:.4g}")
    q = r.throughput()
    if q is not None:
        print(f"  throughput: {_fmt(q, '.4g')} tokens/s (median)")
    from .analysis.efficiency import coverage, divergence, failure
    from .analysis.efficiency import percent
    from .report import run_status

    why, failed, c = divergence(r), failure(r), coverage(r)  # "run 'x' (tier t) diverged: val_loss nan at step ..."
    status = ("diverged: " + why.split(" diverged: ", 1)[1] if why else
              failed + ("" if c is None else f" at {percent(c)} of budget") if failed else run_status(r))
    print(f"  status: {status}")
    from .records.writer import failure_history_lines  # failures a resume withdrew (run.json failure_history)

    for line in failure_history_lines(i.extras):
        print(f"  earlier: {line}")
    if r.measurements:
        steps = [m.step for m in r.measurements]
        print(f"  measurement steps: {steps[0]} .. {steps[-1]}")
        last = r.measurements[-1]
        for name in r.spectrum_names():
            kind = next((m.kinds.get(name) for m in r.measurements if name in m.kinds), None)
            summ = last.summaries.get(name, {})
            parts = [f"{k}={_fmt(v, '.4g')}" for k, v in summ.items() if not k.endswith("_r2")]
            print(f"  spectrum {name!r} ({kind}); last: {', '.join(parts) or '–'}")


def _cmd_inspect(args) -> int:
    path = Path(args.path)
    if path.is_dir() and args.window is not None:
        raise ValueError(f"--window applies to a spectrum .npz file; {path} is a directory (a run's windows are "
                         "in its run.json; predict --window LO HI re-fits its runs)")
    if path.is_dir():
        _inspect_run(path, args.strict)
    elif path.is_file():
        _inspect_spectrum(path, _window(args.window))
    elif path.exists():
        raise ValueError(f"{path}: not a regular file or a directory (expected a spectrum .npz file or a run directory)")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    return 0


def _user_error(exc: BaseException) -> str:
    """One line describing a user error (OSError messages name the file; newlines are folded)."""
    from .records.reader import SKIP_HINT

    if isinstance(exc, RecursionError):
        text = "input JSON is nested too deeply"
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = (str(exc) or type(exc).__name__).replace(SKIP_HINT, "run without --strict to skip it")
    return " ".join(text.split())


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush of a closed pipe
    does not print a second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a captured stream in tests): nothing to flush into a pipe
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spectral-lens`` script; returns the exit status.

    Every user error (missing, unreadable or malformed files and directories) prints one line
    ``spectral-lens COMMAND: error: ...`` naming the path and returns 2; a bad argument prints one
    such line and exits with status 2 (``SystemExit``, as argparse does). Warnings (a skipped record
    line, a run that never reached the target) print one line ``spectral-lens COMMAND: warning: ...``
    each.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # parse_args says it as "spectral-lens: error: ...", without the command
        argv = list(sys.argv[1:] if argv is None else argv)
        before = argv[:argv.index(args.command)] if args.command in argv else []
        # an option before the command is the program's (spectral-lens --foo predict), not the command's
        left, mine = list(before), []
        for x in extra:  # each token before the command once: "--foo predict R --foo" has one of each
            if x in left:
                left.remove(x)
                mine.append(x)
        mine = mine or extra
        who = parser.prog if mine is not extra else f"{parser.prog} {args.command}"
        parser.exit(2, f"{who}: error: unrecognized arguments: {' '.join(' '.join(mine).split())}\n")
    _check_window(parser, args)
    from ._warnings import SpectrumFormatError

    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        # each text once: a run's "no recorded tail window" came once per analysis that resolved its window
        # (predict twice, report three times; every catch_warnings resets the once-per-place registry)
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            print(f"spectral-lens {args.command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return {"report": _cmd_report, "predict": _cmd_predict, "inspect": _cmd_inspect}[args.command](args)
        except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
            print(f"spectral-lens {args.command}: interrupted", file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports a command killed by it
        except BrokenPipeError:  # the reader went away (`spectral-lens inspect RUN | head`): stop quietly
            _silence_stdout()
            return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
        except (ValueError, SpectrumFormatError, OSError, ImportError, RecursionError) as exc:
            print(f"spectral-lens {args.command}: error: {_user_error(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

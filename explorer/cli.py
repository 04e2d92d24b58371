"""`python -m explorer`: the same steps on a laptop and on a cluster.

  stats  MODEL [--data D] --out stats.json      router statistics in one pass (calibration split)
  eval   MODEL [--data D]                       perplexity, bits per byte, token count (evaluation split)
MODEL is a folder (including one written by `apply` or `distill`), a hub id, or `demo` (the bundled model).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .data import DataError
from .loading import ModelLoadError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo", help="folder, hub id, or 'demo' (default)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bf16, fp16 or auto")
    p.add_argument("--experts-implementation", default=None, help="eager / grouped_mm / batched_mm")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="demo", help="'demo', a .txt file or folder, or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--block-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="cap per domain and split")
    p.add_argument("--batch-size", type=int, default=8)


def _load(args):
    from .loading import load_model

    src = None if args.model == "demo" else args.model
    return load_model(src, dtype=args.dtype, device=args.device, experts_implementation=args.experts_implementation,
                      trust_remote_code=args.trust_remote_code)


def _data(args, tok):
    from .data import load_data

    return load_data(tok, args.data, block_len=args.block_len, max_tokens=args.max_tokens)


def _progress(label: str):
    def show(done: int, total: int) -> None:
        n = 30 * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * n}{'.' * (30 - n)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def cmd_stats(args) -> int:
    from .stats import collect_stats

    model, tok, view = _load(args)
    ds = _data(args, tok)
    t = time.time()
    stats = collect_stats(model, view, ds.calib, batch_size=args.batch_size, progress=_progress("stats"))
    stats.save(args.out)
    print(f"{stats.info['tokens']:,} calibration tokens, {len(view)} MoE layers, {time.time() - t:.1f}s -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .perplexity import perplexity

    model, tok, view = _load(args)
    ds = _data(args, tok)
    res = perplexity(model, ds.eval, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    print(res)
    for name, d in res.per_domain.items():
        print(f"  {name:<14} ppl {d['ppl']:9.3f}  bpb {d['bpb']:.4f}  tokens {d['tokens']:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explorer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="router statistics in one pass")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("--out", required=True, help="stats.json or stats.npz")
    p.set_defaults(fn=cmd_stats)
    p = sub.add_parser("eval", help="perplexity on the evaluation split")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)
    for extra in _EXTENSIONS:
        extra(sub)
    return ap


_EXTENSIONS: list = []  # later modules add sub-commands (plan, preview, apply, distill)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ModelLoadError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

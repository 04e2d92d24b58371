"""`python -m explorer`: the same steps on a laptop and on a cluster.

  stats  MODEL [--data D] --out stats.json      router statistics in one pass (calibration split)
  eval   MODEL [--data D]                       perplexity, bits per byte, token count (evaluation split)
  plan   MODEL --stats stats.json (--drop-experts F --criterion C | --merge-to M --method M |
                --drop-layers L | --drop-blocks L | --slim F | --prune S) --out plan.json
  preview MODEL plan.json [--data D] [--stats S]  what-if perplexity of a plan, no weights copied
  apply  MODEL plan.json --out DIR [--stats S]    a new, smaller model + tokenizer + plan + summary
MODEL is a folder (including one written by `apply` or `distill`), a hub id, or `demo` (the bundled model).
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .distill import KL_KINDS, TRAINABLE, DistillConfig
from .errors import ExplorerError


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0 (finite), with the range error in words."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return v


def _at_least(n: int):
    """An argparse type: an integer >= n, with the range error in words."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < n:
            raise argparse.ArgumentTypeError(f"must be at least {n}, got {v}")
        return v
    parse.__name__ = f"integer >= {n}"
    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo", help="folder, hub id, or 'demo' (default)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bf16, fp16 or auto (default: auto, the checkpoint's "
                   "own dtype; float32 for the demo)")
    p.add_argument("--experts-implementation", default=None, help="eager / grouped_mm / batched_mm")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--device-map", default=None, help="auto / balanced / sequential: spread a model larger than one "
                   "device over GPUs, CPU and disk (accelerate)")
    p.add_argument("--max-memory", default=None, help="with --device-map: e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights offloaded to disk go")


def _sequential_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequential", action="store_true", help="a model larger than memory: keep the weights on disk "
                   "and run one decoder layer at a time, each weight read once per pass (a local folder; FP8 and "
                   "MXFP4 dequantised per layer; bf16 computes in float32 on a CPU)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="demo", help="'demo', a .txt file or folder, or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--block-len", type=_at_least(2), default=256)
    p.add_argument("--max-tokens", type=_at_least(1), default=None, help="cap per domain and split")
    p.add_argument("--batch-size", type=_at_least(1), default=8)


def _load(args):
    from .loading import load_model

    src = None if args.model == "demo" else args.model
    dtype = args.dtype  # None: the checkpoint's own (a bf16 checkpoint stays bf16 in memory and offload)
    return load_model(src, dtype=dtype, device=args.device, experts_implementation=args.experts_implementation,
                      trust_remote_code=args.trust_remote_code, device_map=args.device_map,
                      max_memory=args.max_memory, offload_folder=args.offload_folder,
                      sequential=getattr(args, "sequential", False))


def _refuse_sequential(args, *what: str) -> None:
    """What runs only on a whole model is refused before anything loads when --sequential asks for layers."""
    asked = [w for w in what if getattr(args, w.lstrip("-").replace("-", "_"), None)]
    if getattr(args, "sequential", False) and asked:
        raise ExplorerError(f"{asked[0]} runs the whole model at once (lm-eval's requests, token by token "
                            "generation); --sequential runs statistics, perplexity and previews only. Leave out "
                            f"{asked[0]}, or load the model in memory or with --device-map auto")


def _data(args, tok, model=None):
    from .data import load_data

    return load_data(tok, args.data, block_len=args.block_len, max_tokens=args.max_tokens, model=model)


def _source(args):
    """The input model's folder (the demo's for 'demo'), which no output may touch."""
    from .hubcache import cached_snapshot
    from .loading import DEMO_MODEL

    if args.model == "demo":
        return DEMO_MODEL
    if not Path(args.model).expanduser().exists():  # a hub id the cache holds: its snapshot folder, read in place
        return cached_snapshot(args.model) or args.model
    return args.model


def _progress(label: str, unit: str = "batch"):
    """A progress bar on stderr with the time left, estimated from the batches done so far."""
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        n = 30 * done // max(total, 1)
        spent = time.perf_counter() - t0
        left = spent / max(done, 1) * (total - done)
        units = unit + ("es" if unit.endswith("ch") else "s")
        sys.stderr.write(f"\r{label} [{'#' * n}{'.' * (30 - n)}] {done}/{total} {units}, {spent:.0f}s spent, "
                         f"about {left:.0f}s left   ")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def cmd_stats(args) -> int:
    from . import processes
    from .outputs import check_output_file
    from .stats import collect_stats

    check_output_file(args.out, _source(args), args.overwrite)  # refused before anything loads
    model, tok, view = _load(args)
    ds = _data(args, tok, model)
    n_batches = -(-len(ds.calib) // args.batch_size)
    print(f"statistics: {int(ds.calib.lengths.sum()):,} calibration tokens in {len(ds.calib)} blocks of {ds.calib.block_len}, "
          f"one pass of {n_batches} batches over {len(view)} MoE layers ({_how(model)}; time left shows after the "
          f"first {'layer' if args.sequential else 'batch'})", file=sys.stderr)
    if processes.group() is not None:
        print(f"{processes.group().get_world_size()} processes, each runs a contiguous share of the batches",
              file=sys.stderr)
    stats = collect_stats(model, view, ds.calib, batch_size=args.batch_size,
                          progress=_progress("stats", "layer" if args.sequential else "batch"))
    if args.hessians:
        from .hessians import add_hessians

        if processes.group() is not None:
            from .errors import ExplorerError

            raise ExplorerError("--hessians is collected by one process: run `stats --hessians` without torchrun")
        add_hessians(stats, model, view, ds.calib, batch_size=args.batch_size,
                     progress=_progress("hessians", "layer" if args.sequential else "batch"))
    if processes.is_main():
        stats.save(args.out)
    mem = f"peak memory {stats.info['peak_rss_bytes'] / 2**30:.2f} GiB RSS"
    if "peak_cuda_bytes" in stats.info:
        mem += f", {stats.info['peak_cuda_bytes'] / 2**30:.2f} GiB on the GPU"
    print(f"{stats.info['tokens']:,} calibration tokens, {len(view)} MoE layers, {stats.info['seconds']:.1f}s, {mem}"
          f" -> {args.out}")
    return 0


def _with_hessians(args, plan, stats, model, view, tok, blocks=None):
    """``stats`` with each expert's input Hessians where ``plan`` edits with them (GPTQ, SparseGPT) and the file
    holds none: collected here on the calibration text (``blocks``, the command's own where it read them; said
    first)."""
    from .hessians import add_hessians, has_hessians

    if stats is None or not plan.needs_hessians() or has_hessians(stats):
        return stats
    if blocks is None:
        from .data import load_data

        blocks = load_data(tok, getattr(args, "data", None) or "demo",
                           block_len=getattr(args, "block_len", None) or 256,
                           max_tokens=getattr(args, "max_tokens", None), model=model).calib
    print(f"GPTQ / SparseGPT: each expert's input Hessian on {blocks.tokens:,} calibration tokens (one more pass; "
          "`stats --hessians` keeps them in the statistics file)", file=sys.stderr)
    return add_hessians(stats, model, view, blocks)


def _how(model) -> str:
    """How the passes will run, in words: in memory, or layer by layer with the compute dtype and memory."""
    from .layerwise import engine_of

    engine = engine_of(model)
    if engine is None:
        return "whole model in memory"
    return engine.describe()


def _tasks_first(args):
    """The tasks of --tasks, built before any model loads (a missing extra or unreachable data is said first)."""
    if getattr(args, "tasks", None) is None:
        return None
    from .tasks import check, resolve

    tasks = resolve(args.tasks)
    check(tasks)
    return tasks


def _task_scores(model, tok, tasks, args) -> dict:
    from .tasks import evaluate_tasks

    return evaluate_tasks(model, tok, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                          batch_size=args.task_batch_size)


def cmd_eval(args) -> int:
    from .perplexity import perplexity
    from .tasks import format_scores

    _refuse_sequential(args, "--tasks", "--speed")
    tasks = _tasks_first(args)
    model, tok, view = _load(args)
    out = {}
    if not args.no_perplexity:
        ds = _data(args, tok, model)
        if args.sequential:
            print(f"perplexity: {_how(model)}", file=sys.stderr)
        res = perplexity(model, ds.eval, batch_size=args.batch_size)
        out["perplexity"] = res.to_dict()
    if tasks is not None:
        out["tasks"] = _task_scores(model, tok, tasks, args)
    if args.json:
        print(json.dumps(out if tasks is not None else out.get("perplexity"), default=float))
        return 0
    if "perplexity" in out:
        print(res)
        for name, d in res.per_domain.items():
            print(f"  {name:<14} ppl {d['ppl']:9.3f}  bpb {d['bpb']:.4f}  tokens {d['tokens']:,}")
    if tasks is not None:
        sc = out["tasks"]
        print(f"tasks ({sc['seconds']:.1f}s):")
        print(format_scores(sc))
    if args.speed:
        from .speed import measure

        ds = _data(args, tok, model)
        runs = sorted((measure(model, ds.eval) for _ in range(args.speed_repeats)), key=lambda r: r.decode_1)
        m = runs[len(runs) // 2]
        print(f"speed ({input_device_name(model)}, median of {len(runs)} runs): prefill {m.prefill:,.0f} tokens/s "
              f"({m.batch} x {m.block_len}), decode {m.decode_1:,.1f} tokens/s at batch 1 "
              f"(range {runs[0].decode_1:,.1f}-{runs[-1].decode_1:,.1f}), {m.decode_b:,.1f} at batch {m.batch}; "
              f"weights {m.weight_bytes / 2**20:,.1f} MiB, peak {m.peak_bytes / 2**20:,.1f} MiB")
    return 0


def input_device_name(model) -> str:
    from .devices import input_device

    return str(input_device(model))


def _task_args(p) -> None:
    p.add_argument("--tasks", default=None, help="lm-eval task accuracy: lm-eval task names (arc_easy,...), `demo` "
                   "(the demo's offline tasks) or a folder of task YAMLs; needs the eval extra")
    p.add_argument("--limit", type=_positive_float, default=None,
                   help="tasks: the first N items of each (below 1: a share)")
    p.add_argument("--num-fewshot", type=_at_least(0), default=None, help="tasks: examples in the prompt (task default)")
    p.add_argument("--task-batch-size", type=_at_least(1), default=32, help="tasks: requests per forward pass")


def _speed_arg(p) -> None:
    p.add_argument("--speed", action="store_true", help="also prefill and decode speed (batch 1 and 8) and memory, "
                   "measured here with transformers' kernels; a plan's as ratios to the original's, interleaved runs")
    p.add_argument("--speed-repeats", type=_at_least(1), default=5, help="--speed: interleaved runs of each")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explorer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="router statistics in one pass")
    _model_args(p); _data_args(p)  # noqa: E702
    _sequential_arg(p)
    p.add_argument("--out", required=True, help="stats.json or stats.npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--hessians", action="store_true", help="also each expert's input Hessians (for GPTQ and "
                   "SparseGPT plans): one more pass, E·(H²+I²) numbers per MoE layer")
    p.set_defaults(fn=cmd_stats)
    p = sub.add_parser("eval", help="perplexity on the evaluation split, and task accuracy with --tasks")
    _model_args(p); _data_args(p); _task_args(p)  # noqa: E702
    _sequential_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-perplexity", action="store_true", help="task accuracy only")
    _speed_arg(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("plan", help="write a compression plan from statistics")
    _model_args(p)
    _sequential_arg(p)  # the reconstruction criterion runs layer by layer
    p.add_argument("--stats", default=None, help="stats.json/.npz from `stats` (every planner but uniform "
                   "--quantise needs them)")
    g = p.add_mutually_exclusive_group(required=True)
    from .planners import PLANNING, preset_methods

    for op in PLANNING.values():  # each operation's planning adds its own options
        op.add_cli(p, g)
    g.add_argument("--recipe", metavar="PLAN", help="replay the recipe of a plan made on another model")
    p.add_argument("--criterion", default="reap", help="frequency, gate-mass, reap (the model's gates), reap-softmax "
                   "(REAP's own definition), reconstruction, ablation, random")
    p.add_argument("--mode", default="uniform", choices=["uniform", "global"])
    p.add_argument("--skip-layers", default="", help="comma-separated MoE layers left untouched")
    p.add_argument("--protect-super", action="store_true", help="never drop REAP's super experts")
    p.add_argument("--method", default=preset_methods()[0], help="merge or prune method: "
                   f"{' | '.join(preset_methods())}")
    p.add_argument("--data", default="demo", help="calibration text for reconstruction/ablation criteria")
    p.add_argument("--block-len", type=_at_least(2), default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("sweep", help="a criterion x amount grid of plans from one statistics pass, each previewed: "
                       "sweep.csv and sweep.html (perplexity against size, ± one standard error) in --out")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("--stats", default=None, help="stats file from `stats` (collected now when left out)")
    p.add_argument("--ops", default="drop,merge,slim,quantise", help="operations to sweep: drop, merge, slim, quantise")
    p.add_argument("--criteria", default="reap,frequency,random", help="criteria of the drop series")
    p.add_argument("--fractions", default="0.125,0.25,0.375,0.5", help="shares of experts dropped or merged away")
    p.add_argument("--x", default="params", choices=["params", "bytes"], help="the figure's size axis")
    p.add_argument("--out", required=True, help="a folder for sweep.csv and sweep.html")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier sweep there")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("preview", help="what-if perplexity of a plan on the unmodified model")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("plan")
    p.add_argument("--stats", default=None, help="needed by slimming and weight pruning")
    _sequential_arg(p)
    _task_args(p)
    p.add_argument("--generate", action="append", default=None, metavar="PROMPT",
                   help="the original's and the preview's greedy continuations of PROMPT, side by side (repeatable)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=32,
                   help="continuation length; prompt plus continuation stay within the model's positions")
    _speed_arg(p)
    p.set_defaults(fn=cmd_preview)
    p = sub.add_parser("apply", help="materialise a plan into a new model folder")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("plan")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", default=None, help="needed by slimming and weight pruning")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity in the summary")
    p.add_argument("--out-of-core", action="store_true", help="edit the checkpoint's safetensors shards without "
                   "loading the model (expert drop, merge, slim, layer and block drop; memory about the largest tensor; "
                   "FP8 and MXFP4 checkpoints keep their format)")
    p.add_argument("--keep-mtp", action="store_true", help="out of core: keep layers stored past num_hidden_layers "
                   "(DeepSeek-V3's multi-token prediction) as they are, instead of leaving them out")
    p.add_argument("--form", default="per-layer", choices=["per-layer", "padded"],
                   help="a plan with different expert counts or widths per layer, or dropped MoE sub-layers: "
                   "per-layer (its shapes in config.json plus modeling_explorer.py: transformers and lm-eval load it "
                   "with trust_remote_code) or padded (zero experts the router never selects, zero neurons and "
                   "blocks up to one count and width: a stock model vLLM, SGLang and llama.cpp load; exact only "
                   "where the router has a selection bias, e.g. DeepSeek-V3, Kimi-K2, GLM-4.5, gpt-oss)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_apply)
    p = sub.add_parser("distill", help="apply a plan, then distill the student from the original")
    _model_args(p); _data_args(p)  # noqa: E702
    p.add_argument("plan")
    p.add_argument("--steps", type=_at_least(1), default=DistillConfig.steps)
    p.add_argument("--lr", type=float, default=DistillConfig.lr)
    p.add_argument("--warmup", type=_at_least(0), default=DistillConfig.warmup, help="steps of linear warm-up")
    p.add_argument("--temperature", type=float, default=DistillConfig.temperature)
    p.add_argument("--kl", default=DistillConfig.kl, choices=list(KL_KINDS))
    p.add_argument("--hidden-mse", type=float, default=DistillConfig.hidden_mse)
    p.add_argument("--expert-kd", type=float, default=DistillConfig.expert_kd)
    p.add_argument("--train", default=DistillConfig.train, choices=list(TRAINABLE))
    p.add_argument("--eval-every", type=_at_least(1), default=DistillConfig.eval_every)
    p.add_argument("--cache-teacher-topk", type=int, default=None, metavar="K")
    p.add_argument("--seed", type=int, default=DistillConfig.seed)
    p.add_argument("--shard", action="store_true", help="under torchrun / accelerate launch: shard the student and "
                   "the teacher across the processes with PyTorch's FSDP2 (a student larger than one device) "
                   "instead of a whole copy on each (DDP)")
    p.add_argument("--stats", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_distill)
    return ap


def cmd_plan(args) -> int:
    from . import planners
    from .outputs import check_output_file
    from .plan import Plan
    from .stats import RouterStats

    check_output_file(args.out, _source(args), args.overwrite)
    stats = RouterStats.load_file(args.stats) if args.stats else None
    chosen = [p for p in planners.PLANNING.values() if getattr(args, p.cli_flag, None) is not None]
    if stats is None and (not chosen or chosen[0].cli_needs_stats(args)):
        from .plan import PlanError

        raise PlanError("plan: --stats is needed to choose what to drop, merge, slim or prune and to weigh bits by "
                        "importance (collect them with `python -m explorer stats`); only a uniform --quantise "
                        "plans without them")
    recipe = Plan.load(args.recipe).recipe if args.recipe is not None else None
    skip = [int(x) for x in args.skip_layers.split(",") if x.strip()]
    model, tok, view = _load(args)
    name, kw = chosen[0].from_cli(args, skip, view) if chosen else (None, {})
    score_kw = {}
    needs_model = (kw.get("criterion") in ("reconstruction", "ablation") and planners.takes_scores(name)) or any(
        r.get("criterion") in ("reconstruction", "ablation") for r in recipe or [])
    if needs_model:
        from .data import load_data

        score_kw = dict(model=model, blocks=load_data(tok, args.data, block_len=args.block_len, model=model).calib)
    if recipe is not None:
        plan = planners.replay(recipe, stats, view, **score_kw)
    else:
        plan = planners.make(name, stats, view, **kw, **(score_kw if planners.takes_scores(name) else {}))
    rep = plan.report(view)
    plan.to_json(args.out) if not str(args.out).endswith((".yaml", ".yml")) else plan.to_yaml(args.out)
    print(f"{plan.notes} -> {args.out}")
    for tool, text in plan.recipes(view).items():  # the same scheme for the tools users run at scale
        beside = Path(args.out).with_suffix(f".{tool}.yaml")
        check_output_file(beside, _source(args), args.overwrite)
        beside.write_text(text, encoding="utf-8")
        print(f"{tool} recipe -> {beside}")
    _print_report(rep)
    crit = kw.get("criterion")
    from .saliency import CHEAP

    if stats is not None and crit and planners.takes_scores(name) and crit in CHEAP and crit != "random":
        from .saliency import rank_stability
        from .stats import StatsFileError

        try:  # how far the ranking the plan followed holds on another sample of the text
            print(f"ranking {rank_stability(stats, crit).sentence()}")
        except StatsFileError as err:
            print(f"ranking stability not measured: {err}")
    return 0


def cmd_sweep(args) -> int:
    from .figures import sweep_figure
    from .outputs import atomic_write, check_output_file
    from .stats import RouterStats, collect_stats
    from .sweep import run_sweep, sweep_plans, write_csv

    out = Path(args.out)
    files = [out / "sweep.csv", out / "sweep.html"]
    for f in files:  # refused before anything loads: inside the input model, or over a file without --overwrite
        check_output_file(f, _source(args), args.overwrite)
    fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    if not fractions or not all(0 < f < 1 for f in fractions):
        from .plan import PlanError

        raise PlanError(f"--fractions are shares between 0 and 1, got {args.fractions!r}")
    model, tok, view = _load(args)
    ds = _data(args, tok, model)
    stats = (RouterStats.load_file(args.stats) if args.stats else
             collect_stats(model, view, ds.calib, batch_size=args.batch_size, progress=_progress("stats")))
    plans = sweep_plans(stats, view, [o.strip() for o in args.ops.split(",") if o.strip()],
                        [c.strip() for c in args.criteria.split(",") if c.strip()], fractions)
    print(f"sweep: {len(plans)} plans from one statistics pass, each previewed on {int(ds.eval.lengths.sum()):,} "
          "tokens", file=sys.stderr)
    bar = _progress("sweep", "plan")
    points = run_sweep(model, view, stats, ds.eval, plans, progress=lambda i, n, _: bar(i, n))
    bar(len(plans), len(plans))
    write_csv(points, files[0])
    atomic_write(files[1], sweep_figure(points, x=args.x).to_html(include_plotlyjs=True, full_html=True))
    base = points[0]
    for p in points[1:]:
        print(f"{p.series:<18} {p.plan:<48} {p.params:>12,} params  perplexity {p.ppl:8.3f} ± {p.ppl_se:.3f}  "
              f"{p.change:+.1%} ± {p.change_se:.1%}{'  within noise' if p.within_noise else ''}")
    print(f"original: perplexity {base.ppl:.3f} ± {base.ppl_se:.3f}, {base.params:,} params -> {files[0]}, {files[1]}")
    return 0


def _print_report(rep: dict) -> None:
    from .report import size_lines

    print("\n".join("  " + line for line in size_lines(rep)))


def cmd_preview(args) -> int:
    from .perplexity import change, perplexity
    from .plan import Plan
    from .preview import preview_perplexity
    from .report import preview_report, preview_result
    from .stats import RouterStats

    _refuse_sequential(args, "--tasks", "--generate", "--speed")
    plan = Plan.load(args.plan)  # a bad plan or statistics file is reported before the model loads
    stats = RouterStats.load_file(args.stats) if args.stats else None
    tasks = _tasks_first(args)
    if args.generate:
        from .tasks import check_prompt_text

        check_prompt_text(args.generate)
    model, tok, view = _load(args)
    if args.generate:
        from .tasks import encode_prompts

        encode_prompts(model, tok, args.generate, args.max_new_tokens)  # too long for the model: said before work
    ds = _data(args, tok, model)
    stats = _with_hessians(args, plan, stats, model, view, tok, ds.calib)
    base = perplexity(model, ds.eval, batch_size=args.batch_size)
    t = time.perf_counter()
    res = preview_perplexity(model, view, plan, ds.eval, stats=stats, batch_size=args.batch_size)
    print(f"before: {base}")
    print(f"plan:   {res}  ({change(base, res)})")
    print(preview_report(preview_result(res, base, plan.report(view), time.perf_counter() - t)))
    if tasks is not None:
        from .preview import previewing
        from .tasks import compare_scores

        before = _task_scores(model, tok, tasks, args)
        with previewing(model, view, plan, stats):
            after = _task_scores(model, tok, tasks, args)
        print(f"tasks, original -> preview ({before['seconds'] + after['seconds']:.1f}s):")
        print(compare_scores(before, after))
    if args.generate:
        from .tasks import side_by_side

        for row in side_by_side(model, view, plan, tok, args.generate, stats, args.max_new_tokens):
            print(f"--- prompt: {row['prompt']!r}\n  original: {row['original']!r}\n  preview:  {row['preview']!r}")
    if args.speed:
        from .speed import speed_of_plan

        r = speed_of_plan(model, view, plan, ds.eval, stats=stats, repeats=args.speed_repeats)
        print(f"speed of the applied plan against the original ({r.device}; x > 1 is faster, ± half the range of "
              f"{args.speed_repeats} interleaved pairs): {r.short()}")
        for lim in r.limits:
            print(f"  note: {lim}")
    return 0


def _check_out(args) -> None:
    """Refuse a bad output folder before any work is done (see ``explorer.outputs``)."""
    from .outputs import check_export_dir

    check_export_dir(args.out, source=_source(args), overwrite=args.overwrite)


def cmd_apply(args) -> int:
    from .apply import apply_plan, export
    from .perplexity import change, fmt_ppl_se, perplexity
    from .plan import Plan
    from .stats import RouterStats

    _check_out(args)
    plan = Plan.load(args.plan)
    stats = RouterStats.load_file(args.stats) if args.stats else None
    if args.out_of_core:
        from .checkpoint import apply_checkpoint

        t = time.perf_counter()
        if args.form != "per-layer":
            from .plan import PlanError

            raise PlanError("--form padded is written in memory; out of core the plan keeps one expert count per "
                            "layer (a stock model) or writes the per-layer form for Layer Drop")
        out = apply_checkpoint(_source(args), plan, args.out, stats=stats, overwrite=args.overwrite,
                               summary={"source": args.model}, keep_mtp=args.keep_mtp, on_report=_print_report)
        print(f"written out of core to {out} in {time.perf_counter() - t:.1f}s (the model was never loaded)")
        notes = json.loads((out / "summary.json").read_text())
        for k in ("weight_format", "mtp_layers"):
            if k in notes:
                print(f"{k.replace('_', ' ')}: {notes[k]}")
        return 0
    model, tok, view = _load(args)
    rep = plan.report(view, form=args.form)
    _print_report(rep)  # the engines that will load it, said before anything is written
    stats = _with_hessians(args, plan, stats, model, view, tok)
    new, _, layout = apply_plan(model, view, plan, stats=stats, form=args.form)
    summary = {"source": args.model, "report": rep}
    widened = _widened_note(args, new)
    if widened:
        summary["weight_format"] = widened
        print(f"note: {widened}")
    if not args.no_eval:
        ds = _data(args, tok, model)
        before = perplexity(model, ds.eval, batch_size=args.batch_size)
        after = perplexity(new, ds.eval, batch_size=args.batch_size)
        summary["perplexity_before"], summary["perplexity_after"] = before.to_dict(), after.to_dict()
        print(f"perplexity {fmt_ppl_se(before.ppl, before.se)} -> {fmt_ppl_se(after.ppl, after.se)} "
              f"({change(before, after)}; ± one standard error over {before.blocks} blocks)")
    out = export(new, tok, plan, args.out, layout=layout, summary=summary, source=_source(args),
                 overwrite=args.overwrite, view=view)
    stored = json.loads((out / "summary.json").read_text()).get("weight_format")
    if stored and stored != widened:
        print(f"note: {stored}")
    written = json.loads((out / "summary.json").read_text())["bytes_written"]
    print(f"written to {out}: {written / 2**20:.1f} MiB of weights" +
          ("" if layout is None else " (per-layer shapes in config.json, with modeling_explorer.py)"))
    return 0


def _widened_note(args, new) -> str | None:
    """The in-memory apply writes the dequantised weights: say so when the input was FP8 / MXFP4 / packed."""
    from .apply import dequantised_note

    return dequantised_note(new, _source(args))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "File too large", "StorageFull")


def _out_of_space(err: BaseException) -> bool:
    """Disk full, quota or file-size limit, whether it comes as an OSError or inside safetensors' own error."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE:
        return True
    return any(w in str(err) for w in _NO_SPACE_WORDS)


SHARED_PASSES = ("stats", "eval", "preview")  # under torchrun, their passes are shared by the processes


@contextmanager
def _processes(args):
    """Under ``torchrun``: join the process group, compute on this process's own GPU, and let only the main
    process print and write; alone: nothing."""
    import contextlib
    import io

    from . import processes

    args.device = processes.start(args.device)
    quiet = not processes.is_main()
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        processes.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in SHARED_PASSES:
            with _processes(args):
                return args.fn(args)
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: `{args.cmd}` stopped; what it was writing was removed, nothing half-written is left",
              file=sys.stderr)
        return 130
    except (ExplorerError, FileNotFoundError, ValueError, FloatingPointError) as err:  # ValueError: torch's and
        # transformers' own refusals of bad input (the explorer's are ExplorerError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the disk filled up, or an operating-system refusal: words, not a traceback
        if _out_of_space(err):
            print(f"error: the disk is full (or a size quota was reached) while `{args.cmd}` was writing; what it "
                  f"was writing was removed. Free space or choose another place. ({str(err).splitlines()[0]})",
                  file=sys.stderr)
            return 4
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            print(f"error: {err.strerror or err}{where}", file=sys.stderr)
            return 2
        raise


def cmd_distill(args) -> int:
    from .apply import export
    from .distill import DistillConfig, Distiller
    from .perplexity import fmt_ppl
    from .plan import Plan
    from .stats import RouterStats

    cfg = DistillConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
                        temperature=args.temperature,
                        kl=args.kl, hidden_mse=args.hidden_mse, expert_kd=args.expert_kd, train=args.train,
                        eval_every=args.eval_every, seed=args.seed, teacher_topk_cache=args.cache_teacher_topk)
    cfg.validate()  # refused before anything loads
    _check_out(args)
    plan = Plan.load(args.plan)
    stats = RouterStats.load_file(args.stats) if args.stats else None
    acc = _accelerator()
    if args.shard and acc is None:
        raise ExplorerError("--shard splits the student across the processes of a launcher: start with torchrun "
                            "--nproc_per_node N -m explorer distill ... --shard (or accelerate launch)")
    main_proc = acc is None or acc.is_main_process
    if acc is not None and args.device is None and not args.shard:
        args.device = str(acc.device)  # sharded: loaded on the CPU, each process's shards moved to its device
    model, tok, view = _load(args)
    ds = _data(args, tok, model)
    stats = _with_hessians(args, plan, stats, model, view, tok, ds.calib)
    d = Distiller.from_plan(model, view, plan, ds.calib, ds.eval, cfg, stats=stats, accelerator=acc,
                            shard=args.shard)
    say = print if main_proc else (lambda *a, **k: None)
    if acc is not None:
        how = "FSDP2, student and teacher sharded" if args.shard else acc.distributed_type.value
        say(f"distributed: {acc.num_processes} processes ({how}), "
            f"{cfg.batch_size // acc.num_processes} blocks each per step of {cfg.batch_size}")
        if args.shard:
            from .sharding import share

            mine, whole = share(d.student)
            print(f"sharded: process {acc.process_index} holds {mine:,} of the student's {whole:,} parameters "
                  f"({mine / whole:.0%})", file=sys.stderr, flush=True)
    if cfg.teacher_topk_cache:
        m = d.teacher_memory()
        say(f"teacher top-{m['k']} cache: {m['topk_cache_bytes'] / 2**20:.1f} MiB instead of "
            f"{m['full_logits_bytes'] / 2**20:.1f} MiB of full logits")
    last = None
    for e in d.run():
        last = e
        if not main_proc:
            continue
        if e.kind == "start":
            print(f"student before distillation: perplexity {fmt_ppl(e.ppl)}")
        elif e.kind in ("step", "eval"):
            n = 30 * e.step // cfg.steps
            eta = f" eta {e.eta:.0f}s" if e.eta is not None else ""
            sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] step {e.step}/{cfg.steps} loss {e.loss:.4f} "
                             f"{e.tokens_per_s:,.0f} tok/s{eta}   ")
            if e.kind == "eval":
                sys.stderr.write("\n")
                print(f"step {e.step}: loss {e.loss:.4f}, perplexity {fmt_ppl(e.ppl)} (best {fmt_ppl(e.best_ppl)})",
                      flush=True)
        elif e.kind == "error":
            print(f"\nerror: {e.message}", file=sys.stderr)
    warn = d.divergence()
    final = d.final_model()  # every process: sharded weights are gathered onto the main one
    if main_proc:  # one output folder, written by one process
        summary = {"source": args.model, "plan": plan.notes, "config": cfg.__dict__,
                   "initial_ppl": d.initial_ppl, "best_ppl": d.best_ppl, "steps": d.step, "tokens": d.tokens,
                   "kept_step": d.best_step, "warning": warn, "processes": d.world,
                   "sharded": args.shard,
                   "history": [e.to_dict() for e in d.history if e.kind in ("start", "eval")]}
        out = export(final, tok, plan, args.out, layout=d.layout, summary=summary, source=_source(args),
                     overwrite=args.overwrite, view=view)
        print(f"student of step {d.best_step} (perplexity {fmt_ppl(d.best_ppl)}, from {fmt_ppl(d.initial_ppl)}) "
              f"written to {out}")
    if acc is not None:
        acc.wait_for_everyone()
    if last is not None and last.kind == "error":
        return 1
    if warn:
        say(warn, file=sys.stderr)
        return 3
    return 0


def _accelerator():
    """accelerate's Accelerator when this process was started by a launcher (accelerate launch, torchrun)."""
    import os

    for var, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            # the student would be sharded, but evaluation splits blocks unevenly over the processes, the teacher
            # is whole on every process and the export reads unsharded weights: refused rather than half-working
            raise ValueError(f"distillation under accelerate's {engine} plugin is not supported: launch with DDP "
                             "(accelerate launch --multi_gpu, or torchrun), and add --shard for the explorer's own "
                             "FSDP2 when the student does not fit one GPU")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import Accelerator

    # transformers 5 fuses each layer's experts into one tensor: every parameter gets a gradient each step
    return Accelerator(cpu=not torch.cuda.is_available())

"""Downstream task accuracy with lm-evaluation-harness, on the original, a preview, an export or a student.

The harness does the evaluating (its request batching, its metrics and standard errors); this module only says
which tasks (lm-eval names, the demo's offline tasks, or a folder of task YAMLs), checks them before a model loads,
and reads the numbers back. A preview is scored by running the harness inside ``explorer.preview.previewing``:
the masks and edits act on the unmodified model, nothing is copied.

lm-eval is an optional extra (``pip install -e ".[eval]"``); without it every entry point says so in words.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ExplorerError
from .assets import ASSETS
from .taskfiles import MAX_TASKS_IN_FOLDER, check_task, install_sandbox, read_yaml

DEMO_TASKS = ASSETS / "tasks"
HEADLINE = ("acc", "exact_match", "acc_norm", "f1", "bleu")  # the metric shown first, in this order of preference


class TaskError(ExplorerError):
    """Tasks that cannot be run; the message says why (missing extra, unknown task, unreachable dataset)."""


def require_lm_eval() -> None:
    """lm-eval importable, with its template renderer swapped for the sandbox (task templates are data)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise TaskError("task accuracy needs lm-evaluation-harness, an optional extra: pip install -e \".[eval]\" "
                        f"(or pip install 'lm-eval>=0.4.13,<0.5'); {err}") from None
    install_sandbox()


# lm-eval tasks a shared app offers (its own task files, shipped with the package); anything else needs a private app
SHARED_LM_EVAL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa",
                        "lambada_openai", "sciq", "mmlu", "gsm8k", "truthfulqa_mc2", "wikitext")


def demo_task_names() -> list[str]:
    """The demo's offline tasks, by the names of its YAMLs (a name is looked up in this list, never made a path)."""
    return sorted(p.stem for p in DEMO_TASKS.glob("*.yaml"))


def split_spec(spec: str | list) -> list:
    """The parts of a task field: comma-separated text or a list; empty parts dropped; none at all refused."""
    parts = [p.strip() if isinstance(p, str) else p for p in (spec.split(",") if isinstance(spec, str) else spec)
             if not isinstance(p, str) or p.strip()]
    if not parts:
        raise TaskError("no tasks given: name lm-eval tasks (arc_easy,hellaswag...), `demo`, or a folder of task "
                        "YAMLs")
    return parts


def _yaml_task(path: Path, roots: Iterable[Path] = ()) -> dict:
    return check_task(read_yaml(path), path, roots)


def resolve(spec: str | list, roots: Iterable[Path] = ()) -> list[dict | str]:
    """Task configs or lm-eval names from ``spec``: comma-separated lm-eval task names, ``demo`` (the demo's
    offline tasks), a demo task's name, a folder of task YAMLs or one YAML file. Every YAML is read as data
    (``explorer.taskfiles``); its data files lie beside it or in one of ``roots``."""
    roots = list(roots)
    out: list[dict | str] = []
    demo = demo_task_names()
    for p in split_spec(spec):
        if isinstance(p, dict):  # already a task config
            out.append(p)
            continue
        if p == "demo":
            out += [_yaml_task(DEMO_TASKS / f"{n}.yaml") for n in demo]
            continue
        if p in demo:
            out.append(_yaml_task(DEMO_TASKS / f"{p}.yaml"))
            continue
        path = Path(p).expanduser()
        if path.is_dir():
            ys = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
            if not ys:
                raise TaskError(f"the folder {path} holds no task YAML")
            if len(ys) > MAX_TASKS_IN_FOLDER:
                raise TaskError(f"the folder {path} holds {len(ys)} task YAMLs (at most {MAX_TASKS_IN_FOLDER})")
            out += [_yaml_task(y, roots) for y in ys]
        elif path.suffix in (".yaml", ".yml"):
            if not path.exists():
                raise TaskError(f"task file not found: {path}")
            out.append(_yaml_task(path, roots))
        else:
            out.append(p)
    return out


_TASK_MANAGER = None


def task_manager():
    """lm-eval's index of its task YAMLs, built once per process (it reads thousands of files: about 9 s)."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


@contextlib.contextmanager
def _progress_bars_held():
    """lm-eval draws a progress bar per task and request kind (eight for the demo tasks, each call): in a notebook
    they fill the page. What it writes to stderr is held, and shown only if the evaluation fails."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue()[-4000:])
        raise


def _quiet() -> None:
    """lm-eval logs every task it builds and every batch; the explorer reports the outcome itself."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check(tasks: list[dict | str]) -> dict:
    """Build every task (reads its dataset) before any model loads: an unknown name or a dataset that cannot be
    reached (offline, no cache) is a TaskError in words. Returns lm-eval's task objects, to be reused."""
    require_lm_eval()
    from lm_eval.tasks import get_task_dict

    _quiet()
    names = [t for t in tasks if isinstance(t, str)]
    tm = task_manager()
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise TaskError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`; or give a folder "
                        "of task YAMLs, or `demo`)")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return get_task_dict(list(tasks), tm)
    except Exception as err:  # datasets raise many kinds: connection, file not found, missing config
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TaskError(f"the tasks' data cannot be read ({type(err).__name__}: {first}); tasks from the hub need "
                        "a network or a datasets cache; the demo's tasks (`demo`) and task folders work offline") \
            from None


def evaluate_tasks(model, tokenizer, tasks: str | list, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 32,
                   progress: Callable[[str], None] | None = None) -> dict:
    """{task: {metric, value, stderr, n, metrics}} of ``model`` as it is now (inside ``previewing`` that is the
    preview). ``limit``: the first N items of each task (a float below 1: that share)."""
    task_dict = check(resolve(tasks))  # says first when lm-eval is missing
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    t0 = time.perf_counter()
    if progress:
        progress(f"scoring {len(task_dict)} task(s)")
    with _progress_bars_held():
        res = lm_eval.simple_evaluate(model=lm, tasks=list(task_dict.values()), limit=limit, num_fewshot=num_fewshot,
                                      bootstrap_iters=100, log_samples=False, verbosity="ERROR",
                                      task_manager=task_manager())
    seconds = time.perf_counter() - t0
    out = {}
    for task, row in res["results"].items():
        metrics = {}
        for key, v in row.items():
            if "," not in key or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = row.get(f"{metric}_stderr,{filt}")
            metrics[metric] = {"value": float(v), "stderr": float(se) if isinstance(se, (int, float)) else math.nan,
                               "filter": filt}
        if not metrics:
            continue
        head = next((m for m in HEADLINE if m in metrics), next(iter(metrics)))
        n = (res.get("n-samples") or {}).get(task, {}).get("effective")
        out[task] = {"metric": head, "value": metrics[head]["value"], "stderr": metrics[head]["stderr"], "n": n,
                     "metrics": metrics}
    return {"tasks": out, "seconds": seconds, "requests": _requests(task_dict)}


def _requests(task_dict: dict) -> int:
    """How many requests the harness answered (for requests per second): the instances each task built."""
    return sum(_requests(t) if isinstance(t, dict) else len(t.instances) for t in task_dict.values())


def format_scores(scores: dict) -> str:
    lines = []
    for task, s in scores["tasks"].items():
        se = "" if math.isnan(s["stderr"]) else f" ± {100 * s['stderr']:.1f}"
        lines.append(f"  {task:<28} {s['metric']:<12} {100 * s['value']:6.1f}{se}  (n={s['n']})")
    return "\n".join(lines)


def compare_scores(before: dict, after: dict) -> str:
    """Two score sets task by task: before, after, the change and whether it is beyond twice the standard error."""
    lines = []
    for task, a in before["tasks"].items():
        b = after["tasks"].get(task)
        if b is None:
            continue
        d = b["value"] - a["value"]
        flag = _noise(d, a["stderr"], b["stderr"])
        lines.append(f"  {task:<28} {a['metric']:<12} {100 * a['value']:6.1f} -> {100 * b['value']:6.1f} "
                     f"({100 * d:+.1f}){flag and '  ' + flag}")
    return "\n".join(lines)


def compare_rows(base: dict, cut: dict, stderr: dict) -> str:
    """Markdown: each task's accuracy, original against the plan, and whether the change is beyond twice the
    standard error (the original's stands for both: two measurements of equal size)."""
    lines = ["| task | original | plan | change |", "|---|---|---|---|"]
    for t, a in base.items():
        b = cut.get(t)
        if b is None:
            continue
        se = stderr.get(t, math.nan)
        note = _noise(b - a, se, se, "noise")
        lines.append(f"| {t} | {100 * a:.1f} | {100 * b:.1f} | {100 * (b - a):+.1f}{note and ' ' + note} |")
    return "\n".join(lines)


def _noise(change: float, se_a: float, se_b: float, within: str = "within noise") -> str:
    """"(within noise)" or "(beyond 2 s.e.)" for a change between two scores, by their combined standard error;
    "" when a standard error is unknown."""
    se = math.hypot(se_a, se_b)
    if math.isnan(se):
        return ""
    return f"({within})" if abs(change) <= 2 * se else "(beyond 2 s.e.)"


def check_prompt_text(prompts: list[str]) -> None:
    """Prompts are UTF-8 text (a command line can hand over other bytes); said before any model loads."""
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise TaskError(f"the prompt {p[:40]!r} is not valid UTF-8 text") from None


def encode_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int,
                   max_prompt_tokens: int | None = None) -> list:
    """Each prompt's token ids on the model's device, all checked before any runs: UTF-8, not empty, at most
    ``max_prompt_tokens``, prompt plus ``max_new_tokens`` within the model's positions."""
    check_prompt_text(prompts)
    positions = getattr(model.config, "max_position_embeddings", None)
    dev = next(model.parameters()).device
    encoded = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        if not ids.numel():
            raise TaskError("an empty prompt has nothing to continue")
        if max_prompt_tokens is not None and n > max_prompt_tokens:
            raise TaskError(f"a prompt of {n} tokens; at most {max_prompt_tokens} here")
        if positions and n + max_new_tokens > positions:
            raise TaskError(f"a prompt of {n} tokens plus {max_new_tokens} new ones passes the model's "
                            f"{positions} positions; ask for at most {max(positions - n, 0)} new tokens")
        encoded.append(ids.to(dev))
    return encoded


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, max_prompt_tokens: int | None = None,
             max_time: float | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (what the model as it is now says: inside ``previewing``, the preview).
    Every prompt is checked before any runs (``encode_prompts``). ``max_time``: seconds for all prompts together (a continuation that
    reaches it is cut there)."""
    import torch

    encoded = encode_prompts(model, tokenizer, prompts, max_new_tokens, max_prompt_tokens)
    outs = []
    deadline = None if max_time is None else time.perf_counter() + max_time
    with torch.no_grad():
        for ids in encoded:
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                outs.append("")  # the time was spent on the prompts before it
                continue
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                               **({} if left is None else {"max_time": left}))
            outs.append(tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def side_by_side(model, view, plan, tokenizer, prompts: list[str], stats=None, max_new_tokens: int = 32,
                 max_prompt_tokens: int | None = None, max_time: float | None = None) -> list[dict]:
    """[{prompt, original, preview}]: the original's and the preview's greedy continuations, same prompts
    (``max_time`` shared by the two halves)."""
    from .preview import previewing

    half = None if max_time is None else max_time / 2
    orig = generate(model, tokenizer, prompts, max_new_tokens, max_prompt_tokens, half)
    with previewing(model, view, plan, stats):
        prev = generate(model, tokenizer, prompts, max_new_tokens, max_prompt_tokens, half)
    return [{"prompt": p, "original": a, "preview": b} for p, a, b in zip(prompts, orig, prev)]


DEMO_PROMPTS = ["def fibonacci(n):\n", "ROMEO.\nBut soft, what light", "In the beginning God created",
                "The :mod:`json` module"]


def summary_row(scores: dict) -> dict[str, Any]:
    """{task: value} for tables (the Compare tab, RESULTS)."""
    return {t: s["value"] for t, s in scores["tasks"].items()}

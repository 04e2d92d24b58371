"""A task YAML is data, never code: read without aliases, only the keys a task needs, data files inside its folder.

lm-eval treats a task YAML as code: it renders ``doc_to_text`` and friends with an unsandboxed Jinja environment
(``{{ lipsum.__globals__['os'].system(...) }}`` runs a command), resolves unknown metric names through
``evaluate.load`` (a local script path runs), and reads ``data_files`` from anywhere. The explorer reads task files
through this module only: every key is checked against what a task of data may hold, every template is parsed and
refused if it reaches beyond the document's fields, lm-eval's renderer is swapped for Jinja's immutable sandbox (so a
template that slipped past the check still cannot escape), and data files must lie inside the task's folder (or a
folder the app's owner allowed).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import yaml

from .assets import ASSETS
from .errors import ExplorerError

MAX_TASK_FILE = 256 * 1024       # bytes: a task YAML is a page of settings, not a data set
MAX_TEMPLATE = 4000              # characters in one template
MAX_TASKS_IN_FOLDER = 64
FILE_BUILDERS = ("json", "csv", "text", "parquet", "arrow")  # datasets' packaged readers of local files

# What a task of data may say; each value is checked below. Anything else (process_docs, process_results,
# custom_dataset, use_prompt, unsafe_code, include, doc_to_image, ...) is code or a reference to code: refused.
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix")
PLAIN_KEYS = {
    "task": str, "task_alias": str, "tag": (str, list), "dataset_path": str, "dataset_name": (str, type(None)),
    "training_split": str, "validation_split": str, "test_split": str, "fewshot_split": str,
    "target_delimiter": str, "fewshot_delimiter": str, "output_type": str, "num_fewshot": int, "repeats": int,
    "should_decontaminate": bool, "metadata": dict, "dataset_kwargs": dict, "generation_kwargs": dict,
    "metric_list": list, "filter_list": list, "fewshot_config": dict,
}
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
METRICS = ("acc", "acc_norm", "acc_mutual_info", "acc_bytes", "acc_all", "exact_match", "f1", "bleu", "chrf", "ter",
           "mcc", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "brier_score", "likelihood")
AGGREGATIONS = ("mean", "median", "nanmean", "f1", "bleu", "chrf", "ter", "matthews_corrcoef", "perplexity",
                "weighted_perplexity", "bits_per_byte", "brier_score")
METRIC_KEYS = ("metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation", "regexes_to_ignore")
FILTERS = ("regex", "regex_pos", "multi_choice_regex", "take_first", "take_first_k", "lowercase", "uppercase",
           "remove_whitespace", "map", "majority_vote")
GENERATION_KEYS = {"until": (str, list), "max_gen_toks": int, "do_sample": bool, "temperature": (int, float),
                   "top_p": (int, float), "top_k": int}
MAX_GEN_TOKS = 1024
# Jinja's globals that reach Python objects beyond the document (the classic escape is lipsum.__globals__)
UNSAFE_NAMES = ("lipsum", "cycler", "joiner", "namespace", "self", "config", "request", "g")
UNSAFE_FILTERS = ("attr",)


class TaskFileError(ExplorerError):
    """A task file that is not plain data, or names a file outside its folder; the message says which key."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*name`` (and ``<<: *name``) would let nine lines expand to millions of nodes."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's own signature)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a task file (line {mark.line + 1})")
        return super().compose_node(parent, index)


class FunctionTag(str):
    """``!function module.name`` read as the text it names: never imported or run by the explorer."""


_NoAliasLoader.add_constructor("!function", lambda loader, node: FunctionTag(loader.construct_scalar(node)))

# The one code reference a task file may hold: the bundled tasks' loader for lm-eval's CLI, which finds the data
# files beside itself. The explorer ignores it (it reads data_files) and accepts it only beside this exact file.
DATA_LOADER = ASSETS / "tasks" / "demo_data.py"
DATA_LOADER_REF = "demo_data.load"


def read_yaml(path: Path) -> dict:
    """The YAML at ``path`` as plain data (no aliases, at most MAX_TASK_FILE); a ``!function`` tag is read as the
    name it holds (``FunctionTag``), which ``check_task`` refuses but for the bundled data loader."""
    try:
        size = path.stat().st_size
        if size > MAX_TASK_FILE:
            raise TaskFileError(f"task file {path} is {size:,} bytes; a task file holds at most {MAX_TASK_FILE:,} "
                                "(its items belong in a data file beside it)")
        cfg = yaml.load(path.read_text("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "could not determine a constructor" in str(err):
            first = "it uses a YAML tag such as !function (code); a task file is data only"
        raise TaskFileError(f"task file {path} cannot be read: {first}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise TaskFileError(f"{path} is not an lm-eval task YAML (it has no `task:` name)")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# templates

_SANDBOX = None


def sandbox():
    """Jinja's immutable sandbox with lm-eval's settings and its one extra filter: what every template renders in."""
    global _SANDBOX
    if _SANDBOX is None:
        from jinja2 import BaseLoader, StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            from lm_eval.utils import regex_replace

            env.filters["regex_replace"] = regex_replace
        except ImportError:
            pass
        _SANDBOX = env
    return _SANDBOX


def install_sandbox() -> None:
    """lm-eval renders every task template (and the tokenizer's chat template) through ``lm_eval.utils.env``; from
    here on that is the sandbox, for this process. Legitimate templates render the same."""
    import lm_eval.utils

    lm_eval.utils.env = sandbox()


def check_template(text: str, where: str) -> None:
    """Refuse a template that reaches beyond the document's fields: underscored names or attributes, Jinja's object
    globals, the ``attr`` filter, imports, includes, macros. Rendering is sandboxed as well; this says why in words
    before anything runs."""
    from jinja2 import TemplateSyntaxError, nodes

    if len(text) > MAX_TEMPLATE:
        raise TaskFileError(f"{where}: a template of {len(text):,} characters (at most {MAX_TEMPLATE:,})")
    env = sandbox()
    try:
        tree = env.parse(text)
    except TemplateSyntaxError as err:
        raise TaskFileError(f"{where}: not a valid template ({err.message}, line {err.lineno})") from None
    for node in tree.find_all(nodes.Node):
        bad = None
        if isinstance(node, (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends, nodes.Macro,
                             nodes.CallBlock, nodes.Block, nodes.FilterBlock, nodes.With, nodes.ScopedEvalContextModifier)):
            bad = f"a `{type(node).__name__.lower()}` statement"
        elif isinstance(node, nodes.Name) and (node.name.startswith("_") or node.name in UNSAFE_NAMES):
            bad = f"the name `{node.name}`"
        elif isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            bad = f"the attribute `.{node.attr}`"
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                and isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
            bad = f"the item `[{node.arg.value!r}]`"
        elif isinstance(node, (nodes.Filter, nodes.Test)) and node.name in UNSAFE_FILTERS:
            bad = f"the filter `{node.name}`"
        elif isinstance(node, nodes.Const) and isinstance(node.value, str) and node.value.startswith("__"):
            bad = f"the string {node.value!r}"
        if bad:
            raise TaskFileError(f"{where}: the template uses {bad}; a task template may only read the document's "
                                "own fields (e.g. {{question}}, {{choices[0]}}, {{answer|trim}})")


# ---------------------------------------------------------------------------------------------------------------
# the whole task

def _inside(p: Path, roots: Iterable[Path]) -> bool:
    return any(p == r or r in p.parents for r in roots)


def _data_file(f, folder: Path, roots: list[Path], where: str) -> str:
    if not isinstance(f, str) or not f.strip():
        raise TaskFileError(f"{where}: a data file is named by a path, got {f!r}")
    if "://" in f or "::" in f or any(c in f for c in "*?["):
        raise TaskFileError(f"{where}: the data file {f!r} is a URL or a pattern; name one file beside the YAML")
    p = Path(f).expanduser()
    p = (p if p.is_absolute() else folder / p).resolve()
    if not _inside(p, roots):
        raise TaskFileError(f"{where}: the data file {f} lies outside the task's folder {folder}; a task reads only "
                            "files beside its YAML (copy it there)")
    if not p.is_file():
        raise TaskFileError(f"{where}: its data file {f} is not there")
    return str(p)


def _data_files(files, folder: Path, roots: list[Path], where: str):
    if isinstance(files, dict):
        return {str(k): _data_files(v, folder, roots, where) for k, v in files.items()}
    if isinstance(files, list):
        return [_data_file(f, folder, roots, where) for f in files]
    return _data_file(files, folder, roots, where)


def _leaves_plain(value, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise TaskFileError(f"{where}: nested more than 8 deep")
    if isinstance(value, FunctionTag):
        raise TaskFileError(f"{where}: names code (!function {value}); a task file is data only")
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves_plain(k, where, depth + 1)
            _leaves_plain(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _leaves_plain(v, where, depth + 1)
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise TaskFileError(f"{where}: holds a {type(value).__name__}, not plain data")


def _check_metrics(cfg: dict, where: str) -> None:
    for m in cfg.get("metric_list") or []:
        if not isinstance(m, dict) or "metric" not in m:
            raise TaskFileError(f"{where}: each metric_list entry is {{metric: name, ...}}")
        extra = set(m) - set(METRIC_KEYS)
        if extra:
            raise TaskFileError(f"{where}: metric_list takes {', '.join(METRIC_KEYS)}; not {', '.join(sorted(extra))}")
        if m["metric"] not in METRICS:
            raise TaskFileError(f"{where}: the metric {m['metric']!r} is not one of lm-eval's built-in metrics "
                                f"({', '.join(METRICS)})")
        if "aggregation" in m and m["aggregation"] not in AGGREGATIONS:
            raise TaskFileError(f"{where}: the aggregation {m['aggregation']!r} is not one of {', '.join(AGGREGATIONS)}")
        _leaves_plain(m, where)


def _check_filters(cfg: dict, where: str) -> None:
    for f in cfg.get("filter_list") or []:
        if not isinstance(f, dict) or not isinstance(f.get("filter"), list) or set(f) - {"name", "filter"}:
            raise TaskFileError(f"{where}: each filter_list entry is {{name: ..., filter: [{{function: ...}}, ...]}}")
        for step in f["filter"]:
            if not isinstance(step, dict) or step.get("function") not in FILTERS:
                got = step.get("function") if isinstance(step, dict) else step
                raise TaskFileError(f"{where}: the filter function {got!r} is not one of {', '.join(FILTERS)}")
            _leaves_plain(step, where)


def _check_generation(cfg: dict, where: str) -> None:
    g = cfg.get("generation_kwargs")
    if g is None:
        return
    for k, v in g.items():
        if k not in GENERATION_KEYS:
            raise TaskFileError(f"{where}: generation_kwargs takes {', '.join(GENERATION_KEYS)}; not {k!r}")
        if not isinstance(v, GENERATION_KEYS[k]) or (isinstance(v, list) and not all(isinstance(x, str) for x in v)):
            raise TaskFileError(f"{where}: generation_kwargs.{k} has the wrong type ({type(v).__name__})")
    n = g.get("max_gen_toks")
    if n is not None and not 1 <= n <= MAX_GEN_TOKS:
        raise TaskFileError(f"{where}: generation_kwargs.max_gen_toks is {n}; 1 to {MAX_GEN_TOKS}")


def _without_data_loader(cfg: dict, folder: Path, where: str) -> dict:
    """``cfg`` without the bundled tasks' ``custom_dataset: !function demo_data.load`` line, which is accepted only
    when the file beside the YAML is the explorer's own loader, byte for byte, and the task names its data_files
    (what the explorer reads instead). Anything else naming code is refused."""
    ref = cfg.get("custom_dataset")
    if ref is None:
        return cfg
    beside = folder / "demo_data.py"
    if not (isinstance(ref, FunctionTag) and ref == DATA_LOADER_REF and beside.is_file()
            and beside.read_bytes() == DATA_LOADER.read_bytes()):
        raise TaskFileError(f"{where}: custom_dataset names code; a task file may hold only the bundled "
                            f"`custom_dataset: !function {DATA_LOADER_REF}` beside the explorer's own demo_data.py")
    if "data_files" not in (cfg.get("dataset_kwargs") or {}):
        raise TaskFileError(f"{where}: custom_dataset is accepted only with dataset_kwargs.data_files beside it")
    return {k: v for k, v in cfg.items() if k != "custom_dataset"}


def check_task(cfg: dict, path: Path, roots: Iterable[Path] = ()) -> dict:
    """The task ``cfg`` read from ``path``, checked as data, with its data files made absolute (so it runs from any
    working folder). ``roots``: folders besides the YAML's own that its data files may lie in."""
    folder = path.parent.resolve()
    roots = [folder, *[Path(r).resolve() for r in roots]]
    where = f"task {cfg.get('task')!r} ({path})"
    cfg = _without_data_loader(cfg, folder, where)
    for key, value in cfg.items():
        if isinstance(value, FunctionTag):
            raise TaskFileError(f"{where}: {key} names code (!function {value}); a task file is data only")
        if key in TEMPLATE_KEYS:
            if key in ("doc_to_target", "doc_to_choice") and isinstance(value, int):
                continue
            if key == "doc_to_choice" and isinstance(value, (list, dict)):
                _leaves_plain(value, where)
                for v in (value.values() if isinstance(value, dict) else value):
                    if isinstance(v, str):
                        check_template(v, f"{where}, {key}")
                continue
            if not isinstance(value, str):
                raise TaskFileError(f"{where}: {key} is a template string, got {type(value).__name__}")
            check_template(value, f"{where}, {key}")
        elif key in PLAIN_KEYS:
            if not isinstance(value, PLAIN_KEYS[key]) or (PLAIN_KEYS[key] is int and isinstance(value, bool)):
                raise TaskFileError(f"{where}: {key} has the wrong type ({type(value).__name__})")
        else:
            raise TaskFileError(f"{where}: the key {key!r} is not allowed in a task file (it is code or names code); "
                                "a task file may hold: " + ", ".join([*PLAIN_KEYS, *TEMPLATE_KEYS]))
    if cfg.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise TaskFileError(f"{where}: output_type is one of {', '.join(OUTPUT_TYPES)}")
    if not 0 <= cfg.get("num_fewshot", 0) <= 64 or not 1 <= cfg.get("repeats", 1) <= 16:
        raise TaskFileError(f"{where}: num_fewshot is 0 to 64 and repeats 1 to 16")
    if cfg.get("should_decontaminate"):
        raise TaskFileError(f"{where}: should_decontaminate is not supported for task files")
    for key in ("metadata", "tag"):
        if key in cfg:
            _leaves_plain(cfg[key], where)
    fc = cfg.get("fewshot_config")
    if fc is not None and (set(fc) - {"sampler", "split"} or fc.get("sampler", "default") not in ("default", "first_n")):
        raise TaskFileError(f"{where}: fewshot_config takes sampler (default, first_n) and split only")
    _check_metrics(cfg, where)
    _check_filters(cfg, where)
    _check_generation(cfg, where)
    cfg = copy.deepcopy(cfg)
    kwargs = cfg.get("dataset_kwargs") or {}
    if set(kwargs) - {"data_files"}:
        raise TaskFileError(f"{where}: dataset_kwargs takes data_files only, not "
                            f"{', '.join(sorted(set(kwargs) - {'data_files'}))}")
    source = cfg.get("dataset_path")
    if "data_files" in kwargs:
        if source not in FILE_BUILDERS:
            raise TaskFileError(f"{where}: with data_files, dataset_path is a file reader ({', '.join(FILE_BUILDERS)})")
        kwargs["data_files"] = _data_files(kwargs["data_files"], folder, roots, where)
    elif isinstance(source, str):
        local = source.startswith(("/", ".", "~", "\\")) or (folder / source).exists() or Path(source).exists()
        if source in FILE_BUILDERS or local:
            raise TaskFileError(f"{where}: dataset_path {source!r} reads local files; name them in "
                                "dataset_kwargs.data_files beside the YAML")
    return cfg

"""Load a causal MoE LM from a local folder or a hub id, with errors that say what is wrong."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .assets import DEMO_MODEL
from .errors import ExplorerError
from .hubcache import cached_snapshot, hub_cache_dir, inside_model
from .layout import NoMoELayersError
from .moe import MoEModel

# transformers' loading is not thread-safe: ``no_tie_weights()`` swaps ``PreTrainedModel.tie_weights`` for a no-op
# and back, so two loads at once can leave the no-op in place for every later load in the process (lm_head comes
# back missing, "Cannot copy out of meta tensor"). The app loads from several sessions' threads: one at a time.
_LOAD_LOCK = threading.Lock()


class ModelLoadError(ExplorerError):
    """A model could not be loaded; the message says why and what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype) -> torch.dtype | str:
    """None and 'auto' are the checkpoint's own dtype (float32 for the demo): one rule for the API, the app and the
    CLI, so a bf16 checkpoint never takes twice its memory by default."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def check_device(device: str | None) -> str:
    """The device to use, or ModelLoadError in words: an unknown name, or an accelerator this machine lacks."""
    device = device or default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device!r} is not supported here; use cpu, cuda, cuda:N or mps")
    return device


def _check_config_json(folder: Path) -> None:
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON at line {err.lineno} column {err.colno}: "
                             f"{err.msg}") from err
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{folder / 'config.json'} is not text (UTF-8): the file is damaged") from err


def _check_index(folder: Path) -> None:
    """Every shard a safetensors index names lies inside the model folder (transformers would read
    ``../elsewhere/x.safetensors`` as the index says)."""
    idx = folder / "model.safetensors.index.json"
    if not idx.exists():
        return
    try:
        wmap = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        shards = set(wmap.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{idx} is not a safetensors index with a weight_map: {err}") from err
    for shard in shards:  # a hub cache snapshot's shards are links into its own blob store: those are its own
        if not isinstance(shard, str) or not inside_model(folder, folder / shard):
            raise ModelLoadError(f"{idx}: shard {shard!r} lies outside the model folder; refused")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (checked before a hub id is tried, so offline fails at once)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(source: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def parse_max_memory(text: str | dict | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    if text is None or isinstance(text, dict):
        return text
    out = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, val = part.partition("=")
        if not sep or not val.strip():
            raise ModelLoadError(f"--max-memory wants DEVICE=SIZE pairs such as '0=20GiB,cpu=60GiB', got {part!r}")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = val.strip()
    return out or None


def load_model(source: str | os.PathLike | None = None, *, dtype=None, device: str | None = None,
               experts_implementation: str | None = None, trust_remote_code: bool = False,
               with_tokenizer: bool = True, device_map: str | dict | None = None, max_memory=None,
               offload_folder: str | os.PathLike | None = None,
               sequential: bool = False) -> tuple[PreTrainedModel, object, MoEModel]:
    """(model, tokenizer, MoE view) from a local directory or hub id; the bundled demo model by default.

    dtype: None or 'auto' (the checkpoint's own), a torch dtype or a name ('bf16', ...). A compressed-tensors
    checkpoint (llm-compressor's W4A16, FP8, ...) is dequantised while it loads into plain modules of that dtype
    (``model.explorer_dequantised`` says from what); exports of it are written dequantised.
    device: default cuda when present, else cpu. Weights load only from safetensors. Remote code is refused
    unless ``trust_remote_code=True``. A folder written by ``apply`` with per-layer expert counts is restored.
    device_map ('auto', 'balanced', 'sequential' or a dict) with ``max_memory`` ('0=20GiB,cpu=60GiB') spreads a
    model larger than one device over GPUs, CPU and disk (accelerate's big-model inference; ``offload_folder``
    holds what goes to disk). Statistics, preview and perplexity read offloaded weights through accelerate's hooks.
    sequential: leave the weights on disk and run statistics, perplexity and previews one decoder layer at a time
    (``explorer.layerwise``: each weight read once per pass, memory bounded by a layer and the hidden states).
    """
    src = str(DEMO_MODEL if source is None else source)
    if device_map is None:
        device = check_device(device)
    else:
        try:
            import accelerate  # noqa: F401
        except ImportError as err:
            raise ModelLoadError("--device-map needs accelerate: pip install accelerate") from err
        max_memory = parse_max_memory(max_memory)
    torch_dtype = _dtype(dtype)
    local = Path(src).expanduser()
    if local.exists():
        _check_local_folder(local, src)
    elif _looks_like_path(src) or source is None:
        raise ModelLoadError(f"model path not found: {src}")
    elif not hub_reachable():
        snap = cached_snapshot(src)
        if snap is None:
            raise ModelLoadError(f"{src!r} is not a local folder, the model hub cannot be reached (offline?) and the "
                                 f"hub cache ({hub_cache_dir()}) does not hold it. Pass the path of a local model "
                                 "folder.")
        return load_model(snap, dtype=dtype, device=device, experts_implementation=experts_implementation,
                          trust_remote_code=trust_remote_code, with_tokenizer=with_tokenizer, device_map=device_map,
                          max_memory=max_memory, offload_folder=offload_folder, sequential=sequential)
    plan = _stored_layout(local) if local.exists() else None
    partial = _partial_fp8_blocks(local, src) if local.exists() else []
    if sequential and not local.exists():
        raise ModelLoadError(f"--sequential reads a local checkpoint folder; {src} is not one")
    if device_map is not None and not sequential and not partial and plan is None and local.exists():
        _check_offload_folder(offload_folder, local, src)
        if _too_large_for_device_map(local, src, max_memory):
            device, sequential, device_map = _first_device(max_memory), True, None
    config = _read_config(src, trust_remote_code)
    if sequential or partial:
        if device_map is not None:
            raise ModelLoadError("--sequential runs the model one decoder layer at a time on one device; leave out "
                                 "--device-map" if sequential else
                                 f"{src} has FP8 weights that do not fill whole blocks ({partial[0]}); the explorer "
                                 "reads those itself, in memory or with --sequential, not with --device-map")
        if plan is not None:
            raise ModelLoadError(f"{src} has per-layer expert shapes (explorer_layout.json); load it without "
                                 "--sequential")
        model, view = _own_reader(local, torch_dtype, device, trust_remote_code, sequential)
        return model, (_tokenizer(src, trust_remote_code) if with_tokenizer else None), view
    kw = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    made_offload = None
    if device_map is not None:
        made_offload = _device_map_kw(kw, src, local, plan, device_map, max_memory, offload_folder)
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    dequantised = _dequantise_on_load(config, kw, src)
    model = _transformers_load(src, local, config, kw, plan)
    _forget_per_layer(model)
    if dequantised:
        model.explorer_dequantised = dequantised
        if isinstance(torch_dtype, torch.dtype) and any(p.is_floating_point() and p.dtype != torch_dtype
                                                        for p in model.parameters()):
            model.to(torch_dtype)  # transformers dequantises fused experts in the checkpoint's dtype: cast once
    if device_map is None:
        model.to(device)
    elif made_offload is not None:  # our temporary offload copies go with the model (or at exit), not left behind
        weakref.finalize(model, shutil.rmtree, made_offload, True)
    model.eval()
    try:
        view = MoEModel(model)
    except NoMoELayersError as err:
        raise ModelLoadError(f"{src}: {err}") from err
    return model, (_tokenizer(src, trust_remote_code) if with_tokenizer else None), view


def _partial_fp8_blocks(local: Path, src: str) -> list[str]:
    """The checkpoint's tensors checked against its config from the headers alone; the FP8 weights that do not
    fill whole blocks (the explorer reads those itself)."""
    from .weightformats import WeightFormatError, check_checkpoint

    try:
        return check_checkpoint(local)
    except WeightFormatError as err:
        raise ModelLoadError(f"{src}: {err}") from err


def _too_large_for_device_map(local: Path, src: str, max_memory) -> bool:
    """Whether ``max_memory`` cannot hold the model (disk aside): accelerate would offload to disk and read it all
    again for every batch, so the model runs layer by layer instead, and the log says so."""
    big = _larger_than_allowed(local, max_memory)
    if big is None:
        return False
    logging.getLogger("explorer").warning(
        "%s holds %.2f GiB of weights, more than --max-memory allows (%.2f GiB): running it layer by layer on %s "
        "instead (each weight read once per pass; nothing is written to the offload folder)",
        src, big[0] / 2**30, big[1] / 2**30, _first_device(max_memory))
    return True


def _device_map_kw(kw: dict, src: str, local: Path, plan: dict | None, device_map, max_memory,
                   offload_folder) -> str | None:
    """Adds accelerate's big-model arguments to ``kw``; returns the temporary offload folder it made, if any."""
    if plan is not None and plan.get("format") != "checkpoint":
        raise ModelLoadError(f"{src} has per-layer expert shapes (explorer_layout.json); load it without a device map")
    _check_offload_folder(offload_folder, local, src)
    made = None
    if offload_folder is None:
        offload_folder = made = tempfile.mkdtemp(prefix="explorer-offload-")
    kw.update(device_map=device_map, max_memory=max_memory, offload_folder=str(offload_folder))
    return made


def _check_local_folder(local: Path, src: str) -> None:
    """A local model folder: config.json and safetensors weights (pickle refused), well-formed config and index."""
    if not local.is_dir():
        raise ModelLoadError(f"{src} is a file; pass the folder that holds config.json and *.safetensors")
    if not (local / "config.json").exists():
        raise ModelLoadError(f"{src} has no config.json: not a transformers model folder")
    files = os.listdir(local)
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files):
            raise ModelLoadError(
                f"{src} holds weights only in pickle format (.bin/.pt); the explorer loads safetensors only. "
                "Convert them once with a trusted script (model.save_pretrained(..., safe_serialization=True)).")
        raise ModelLoadError(f"{src} holds no *.safetensors weights")
    _check_config_json(local)
    _check_index(local)


def _read_config(src: str, trust_remote_code: bool):
    """The model's config, refusing remote code unless trusted and anything that is not a causal LM."""
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise ModelLoadError(
                f"{src} needs remote code to load; it is refused by default. If you trust its authors, pass "
                "trust_remote_code=True (CLI: --trust-remote-code).") from err
        raise ModelLoadError(f"cannot read the config of {src}: {err}") from err
    except OSError as err:
        raise ModelLoadError(
            f"cannot load {src!r}: not a local folder, and the hub could not provide it ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). Offline? Pass a local path.") from err
    archs = getattr(config, "architectures", None) or []
    if archs and not any(("CausalLM" in a or "LMHead" in a or "ForConditionalGeneration" in a) for a in archs):
        raise ModelLoadError(f"{src} is not a causal language model (architectures: {', '.join(archs)})")
    return config


def _transformers_load(src: str, local: Path, config, kw: dict, plan: dict | None):
    """The model read by transformers (per-layer shapes of an explorer export restored first), its load report
    said in words: a tensor that does not fit, a missing one, a damaged shard."""
    try:
        if plan is not None:
            with _LOAD_LOCK:
                model = load_applied(local, config, **kw)  # per-layer shapes restored before the weights load
        else:
            with _LOAD_LOCK, _load_report() as report, warnings.catch_warnings():
                # the explorer's own dequantize=True for a compressed-tensors checkpoint is meant: not news
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
                try:
                    model, info = _model_class(config).from_pretrained(src, config=config, output_loading_info=True,
                                                                       **kw)
                except RuntimeError as err:
                    bad = report.rows()
                    if not bad:
                        raise
                    raise ModelLoadError(f"{src}: the weights do not fit the model its config describes: "
                                         f"{'; '.join(bad[:3])}" + (f" (and {len(bad) - 3} more)" if len(bad) > 3
                                                                     else "")) from err
                missing = sorted(info.get("missing_keys") or [])
                if missing:  # refused inside the report's block: its table is then not printed above the words
                    raise ModelLoadError(f"{src}: {len(missing)} weight(s) the model needs are missing from the "
                                         f"checkpoint ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                                         "); transformers would fill them with random numbers. Copy or export the "
                                         "model again")
    except ModelLoadError:
        raise
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(err):
            raise ModelLoadError(f"{src} is not a causal language model ({type(config).__name__})") from err
        raise ModelLoadError(f"cannot load {src}: {err}") from err
    except OSError as err:
        raise ModelLoadError(f"cannot load the weights of {src}: {str(err).splitlines()[0]}") from err
    except SafetensorError as err:
        raise ModelLoadError(f"the weights of {src} are damaged or incomplete (safetensors: {err}); copy or export "
                             "the model again") from err
    return model


def _model_class(config):
    """The class that reads ``config``: transformers' own, or for an export with per-layer MoE shapes
    (``explorer.perlayer``) the family's class with the explorer's restoring step mixed in: the same class as the
    export's ``modeling_explorer.py``, built here so that no code from the folder runs."""
    from .perlayer import PER_LAYER_KEY, PerLayerMoE

    if not getattr(config, PER_LAYER_KEY, None):
        return AutoModelForCausalLM
    try:
        base = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as err:
        raise ModelLoadError(f"{type(config).__name__} has no causal-LM class in this transformers") from err
    return type(base.__name__, (PerLayerMoE, base), {})


def _forget_per_layer(model) -> None:
    """The loaded model holds its per-layer shapes: the config fields that rebuilt them are the export's, not the
    model's (an export of it records them anew, or none when its layers are uniform again)."""
    from .perlayer import PER_LAYER_KEY

    cfg = model.config
    if PER_LAYER_KEY in cfg.__dict__:
        for k in (PER_LAYER_KEY, "auto_map"):
            cfg.__dict__.pop(k, None)
        cfg.architectures = [type(model).__name__]


def _check_offload_folder(offload_folder, local: Path, src: str) -> None:
    if offload_folder is not None and local.exists():
        off, root = Path(offload_folder).expanduser().resolve(), local.resolve()
        if off == root or root in off.parents:
            raise ModelLoadError(f"the offload folder {offload_folder} lies inside the model folder {src}; the "
                                 "explorer never writes into its input: choose a folder outside it")


def _larger_than_allowed(folder: Path, max_memory: dict | None) -> tuple[int, int] | None:
    """(stored bytes, allowed bytes) when ``max_memory`` (disk aside) cannot hold the checkpoint's tensors."""
    if not max_memory:
        return None
    import math

    from accelerate.utils import convert_file_size_to_int

    from .layerwise import SAFETENSORS_ITEMSIZE
    from .weightformats import checkpoint_heads

    allowed = sum(convert_file_size_to_int(v) if isinstance(v, str) else int(v)
                  for k, v in max_memory.items() if k != "disk")
    stored = sum(math.prod(shape) * SAFETENSORS_ITEMSIZE.get(dtype, 4)
                 for shape, dtype in checkpoint_heads(folder).values())
    return (stored, allowed) if stored > allowed else None


def _first_device(max_memory: dict) -> str:
    """The device the layer-by-layer engine runs on when a device map asked for too little memory: the first GPU
    the map names, else the CPU."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return f"cuda:{gpus[0]}" if gpus and torch.cuda.is_available() else "cpu"


def _tokenizer(src: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{src} has no usable tokenizer: {str(err).splitlines()[0]}") from err


def _own_reader(folder: Path, dtype, device: str, trust_remote_code: bool, sequential: bool):
    """(model, view) read by the explorer's layer-by-layer engine: left layer by layer (``sequential``), or with
    every layer read once into memory (FP8 checkpoints with partial blocks, which transformers misreads)."""
    from .layerwise import LayerwiseError, LayerwiseModel

    try:  # layer by layer, a half-precision checkpoint computes in float32 on a CPU; in memory it keeps 'auto'
        engine = LayerwiseModel(folder, dtype=None if dtype == "auto" else dtype, device=device,
                                trust_remote_code=trust_remote_code, upcast_on_cpu=sequential,
                                keep_fp8=None if sequential else False)
        if sequential:
            return engine.model, engine.view
        model = engine.materialise()
        view = MoEModel(model)
    except (LayerwiseError, NoMoELayersError) as err:
        raise ModelLoadError(f"{folder}: {err}") from err
    model.explorer_dequantised = f"{engine.quantised} (read by the explorer: weights that do not fill whole blocks)"
    return model, view


def _dequantise_on_load(config, kw: dict, src: str) -> str | None:
    """A compressed-tensors checkpoint loads dequantised: plain Linear weights and dense experts, no scale tensors,
    no quantization_config left to export (transformers otherwise keeps modules compressed until a first forward,
    with fused experts in another dtype than the rest). Returns what it was, in words; None for other checkpoints."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else None)
    if not qc or qc.get("quant_method") != "compressed-tensors":
        return None
    try:
        import compressed_tensors  # noqa: F401
        from transformers import CompressedTensorsConfig
    except ImportError as err:
        raise ModelLoadError(f"{src} is quantised with compressed-tensors, which is not installed: pip install -e "
                             f"\".[quant]\" (or pip install compressed-tensors); {err}") from None
    kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    schemes = []
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w:
            what = f"{w.get('num_bits')}-bit {w.get('type')}, {w.get('strategy')}"
            if w.get("group_size"):
                what += f" {w['group_size']}"
            schemes.append(what)
    return (f"compressed-tensors {qc.get('format') or 'quantised'} ({'; '.join(schemes) or 'weights'}), dequantised "
            "on load")


class _Report(logging.Handler):
    """transformers' load report (a table it logs before raising "see the report above"), kept to be said in
    words: which tensor is missing, has the wrong shape or failed to convert."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    @property
    def text(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]

    def emit(self, record):
        self.records.append(record)

    def rows(self) -> list[str]:
        out = []
        for line in re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(self.text)).splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 2 and cells[1] in ("MISSING", "MISMATCH", "CONVERSION", "UNEXPECTED"):
                what = {"MISSING": "missing", "MISMATCH": "wrong shape", "CONVERSION": "cannot be converted",
                        "UNEXPECTED": "not expected"}[cells[1]]
                detail = " ".join(c for c in cells[2:] if c)
                out.append(f"{cells[0]}: {what}" + (f" ({detail})" if detail else ""))
        return [r for r in out if "not expected" not in r] or out


@contextmanager
def _load_report():
    """transformers' log while a model loads goes to the report only: a refusal is then the explorer's words alone,
    not the table above them. A load that succeeds passes the records on to transformers' own handlers."""
    logger = logging.getLogger("transformers")
    handler = _Report()
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    if logger.getEffectiveLevel() > logging.WARNING:  # quieted (set_verbosity_error): the report is still needed
        logger.setLevel(logging.WARNING)
    for h in handlers:
        logger.removeHandler(h)
    logger.addHandler(handler)
    logger.propagate = False
    failed = False
    try:
        yield handler
    except BaseException:
        failed = True
        raise
    finally:
        logger.removeHandler(handler)
        for h in handlers:
            logger.addHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate
        if not failed:
            for record in handler.records:
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)


def restructure(model, layout: dict) -> None:
    """Give a freshly built model the per-layer shapes recorded in ``layout`` (before loading weights)."""
    from .surgery import drop_moe_sublayer, resize_layer

    view = MoEModel(model, check=False)  # the weights are not loaded yet
    by_idx = {lay.layer_idx: lay for lay in view}
    dropped, shapes = _check_layout(layout, by_idx)
    for li in dropped:
        drop_moe_sublayer(by_idx[li], drop_norm=not layout.get("norms_kept", False))
    for li, (E, I) in shapes.items():
        lay = by_idx[li]
        H = lay.hidden_size
        U = lay.up_rows(I)
        gu = torch.empty(E, H, U) if lay.transposed else torch.empty(E, U, H)
        dn = torch.empty(E, I, H) if lay.transposed else torch.empty(E, H, I)
        gb = None if lay.gate_up_bias is None else torch.empty(E, 2 * I)
        db = None if lay.down_bias is None else torch.empty(E, H)
        dt = lay.gate_up.dtype
        tensors = tuple(None if t is None else t.to(dt) for t in (gu, dn, gb, db))
        resize_layer(lay, list(range(E)), tensors, E, I)


def _check_layout(layout, by_idx: dict) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """explorer_layout.json read strictly: every layer it names is one of the model's MoE layers, every count
    and width a positive whole number (a hand-edited or damaged file is said in words, never a KeyError)."""
    where = f"explorer_layout.json (the model's MoE layers are decoder layers {sorted(by_idx)})"

    def layer(v) -> int:
        if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, str) and v.lstrip("-").isdigit()):
            raise ModelLoadError(f"{where}: {v!r} is not a layer index")
        if int(v) not in by_idx:
            raise ModelLoadError(f"{where} names layer {int(v)}, which is not an MoE layer of this model")
        return int(v)

    def positive(v, what: str, li: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelLoadError(f"{where}: layer {li} has {what} {v!r}; expected a positive whole number")
        return v

    if not isinstance(layout, dict) or not isinstance(layout.get("moe", {}), dict) \
            or not isinstance(layout.get("dropped_moe_sublayers", []), list):
        raise ModelLoadError(f"{where} is not a layout written by export (moe must map layers to shapes)")
    dropped = [layer(v) for v in layout.get("dropped_moe_sublayers", [])]
    shapes = {}
    for k, shape in layout.get("moe", {}).items():
        li = layer(k)
        if not isinstance(shape, dict):
            raise ModelLoadError(f"{where}: layer {li} has no shape (num_experts, intermediate)")
        shapes[li] = (positive(shape.get("num_experts"), "num_experts", li),
                      positive(shape.get("intermediate"), "intermediate", li))
    return dropped, shapes


def load_applied(folder: Path, config, dtype=None, use_safetensors=True, trust_remote_code=False,
                 experts_implementation=None, **device_kw):
    """Load a folder written by ``export`` whose per-layer shapes a stock config cannot express."""
    from safetensors.torch import load_model as st_load

    from .surgery import LAYOUT_FILE

    layout = json.loads((Path(folder) / LAYOUT_FILE).read_text())
    kw = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    if layout.get("format") == "checkpoint":
        return _load_checkpoint_layout(folder, config, layout, dtype=dtype, trust_remote_code=trust_remote_code,
                                       **kw, **device_kw)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kw)
    restructure(model, layout)
    st_load(model, str(Path(folder) / "model.safetensors"), strict=True)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model


def _load_checkpoint_layout(folder: Path, config, layout: dict, **kw):
    """An out-of-core export with MoE sub-layers dropped: the stock model loads every other weight under the
    checkpoint's own key names; the dropped sub-layers' weights are the only ones missing, and are then removed."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing weights are expected; say nothing about them
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, output_loading_info=True,
                                                           use_safetensors=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    view = MoEModel(model, check=False)  # checked by load_model once restructured
    names = {id(m): n for n, m in model.named_modules()}
    dropped = [lay for lay in view if lay.layer_idx in set(layout["dropped_moe_sublayers"])]
    gone = tuple(p for lay in dropped for p in (names[id(lay.block)] + ".",
                                                names[id(lay.decoder_layer)] + ".post_attention_layernorm.")
                 if layout.get("norms_kept") is not True or not p.endswith("layernorm."))
    restructure(model, layout)
    strange = [k for k in info.get("missing_keys", []) if not k.startswith(gone)]
    strange += list(info.get("unexpected_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if strange:
        raise ModelLoadError(f"{folder}: weights do not match its layout ({strange[0]}); export it again")
    return model


def _stored_layout(folder: Path) -> dict | None:
    """The per-layer expert layout written by ``apply`` when counts differ across layers, else None."""
    f = folder / "explorer_layout.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{f} cannot be read as JSON ({err}); export the model again") from err

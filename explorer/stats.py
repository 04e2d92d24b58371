"""Router statistics gathered in one hooked forward pass, as running sums on the model's device.

Each MoE block runs through ``MoELayer.forward`` with an observer that sees, per expert that received tokens,
exactly the tokens, gates, inputs, intermediate activations and outputs the block computes anyway: REAP's
``g·‖f_e(x)‖`` needs no second run of the experts and no dense pass. Memory does not grow with the number of
tokens: every statistic is a sum (or max) of fixed size.
"""
from __future__ import annotations

import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ExplorerError
from . import processes
from .data import TokenBlocks
from .layerwise import engine_of, forward_batches
from .devices import forward_hooks, input_device, materialized
from .moe import MoELayer, MoEModel
from .outputs import atomic_write

# per-layer arrays; shapes use E experts, H hidden, I intermediate, D domains
ARRAYS = {
    "count": "[E] top-k selections",
    "gate_mass": "[E] Σ over all tokens of the full router distribution p_e(x)",
    "gate_routed": "[E] Σ of g_e(x) over tokens routed to e",
    "coact": "[E,E] tokens for which both i and j are among the k chosen (all pairs, symmetric)",
    "domain_count": "[D,E] top-k selections per domain",
    "reap": "[E] Σ g_e(x)·‖f_e(x)‖₂ over routed tokens (the model's own gates and routing)",
    "reap_softmax": "[E] Σ g_e(x)·‖f_e(x)‖₂ with REAP's own gates: softmax over all E, top-k, renormalised",
    "count_softmax": "[E] tokens REAP's softmax top-k sends to each expert",
    "out_norm": "[E] Σ ‖f_e(x)‖₂ over routed tokens",
    "out_sum": "[E,H] Σ f_e(x) over routed tokens",
    "dense_out_sum": "[E,H] Σ f_e(x) over an even sample of the real tokens (HC-SMoE's mean output)",
    "act_max": "[E] max |f_e(x)| entry (REAP's super-expert rule)",
    "neuron_sq": "[E,I] Σ h² of each intermediate neuron over routed tokens (slimming)",
    "neuron_sq_gated": "[E,I] Σ (g·h)² over routed tokens (MoE-Pruner on down_proj)",
    "in_sq": "[E,H] Σ x_j² over routed tokens (Wanda)",
    "in_sq_gated": "[E,H] Σ (g·x_j)² over routed tokens (MoE-Pruner)",
    "logit_gram": "[E,E] Σ r_i(x)·r_j(x) router-logit Gram matrix (MC-SMoE similarity)",
    # the same sums over half of the calibration blocks (every other block, so each domain is in both halves): the
    # other half is the total minus this one, and a score's rank stability is its agreement across the two halves
    "half_count": "[E] count, over the even-numbered calibration blocks",
    "half_gate_mass": "[E] gate_mass, over the even-numbered calibration blocks",
    "half_reap": "[E] reap, over the even-numbered calibration blocks",
    "half_reap_softmax": "[E] reap_softmax, over the even-numbered calibration blocks",
    "half_count_softmax": "[E] count_softmax, over the even-numbered calibration blocks",
}
SCALARS = ("tokens", "entropy_sum", "dense_tokens", "layer_cos_sum", "layer_tokens", "half_tokens")
# per-expert input Hessians (``explorer.hessians``): only where a GPTQ or SparseGPT plan asked for them
OPTIONAL_ARRAYS = {
    "hess_in": "[E,H,H] Σ x xᵀ over the tokens routed to each expert (its gate/up input)",
    "hess_mid": "[E,I,I] Σ h hᵀ of each expert's intermediate activations over its routed tokens (its down input)",
    "hess_tokens": "[E] routed tokens the Hessians summed",
}
STORED = {**ARRAYS, **OPTIONAL_ARRAYS}
HALVED = ("count", "gate_mass", "reap", "reap_softmax", "count_softmax", "tokens")  # the sums kept per half


@dataclass
class RouterStats:
    """Everything the plots and scores need. Per-layer lists of numpy arrays (expert counts may differ)."""

    top_k: int
    num_experts: list[int]
    domains: list[str]
    layers: list[dict]  # one dict per MoE layer: ARRAYS + SCALARS
    block_cos_sum: list[float]  # per decoder layer: Σ cos(X_i, X_{i+1}) over tokens
    block_tokens: float
    moe_layer_indices: list[int]
    sample_tokens: list[int] = field(default_factory=list)  # token ids of the routing sample
    sample_routes: list = field(default_factory=list)  # [L][S][k] expert ids for the sample
    sample_gates: list = field(default_factory=list)  # [L][S][k]
    info: dict = field(default_factory=dict)

    # ---- derived views --------------------------------------------------------------------------------
    def load(self, layer: int) -> np.ndarray:
        """Share of routing slots per expert (sums to 1)."""
        c = self.layers[layer]["count"]
        return c / max(c.sum(), 1)

    def load_matrix(self) -> np.ndarray:
        """[L, E_max] load, NaN where a layer has fewer experts."""
        m = np.full((len(self.layers), max(self.num_experts)), np.nan)
        for i in range(len(self.layers)):
            m[i, : self.num_experts[i]] = self.load(i)
        return m

    def load_vs_uniform(self) -> np.ndarray:
        """[L, E_max] load as a multiple of the uniform share k/E of its own layer (1 = a fair share)."""
        return self.load_matrix() * np.array(self.num_experts)[:, None]

    def gate_mass(self, layer: int) -> np.ndarray:
        return self.layers[layer]["gate_mass"] / max(self.layers[layer]["tokens"], 1)

    def reap(self, layer: int, definition: str = "model") -> np.ndarray:
        """REAP's score per expert. ``model``: weighted by the model's own gates on the tokens it routes (what the
        pruned model will compute). ``softmax``: REAP's own observer (softmax over all experts, top-k,
        renormalised); the two are equal for softmax-top-k routers that renormalise, and differ for sigmoid,
        grouped or biased routers (DeepSeek-V3, GLM-4.5) and for routers that do not renormalise."""
        lay = self.layers[layer]
        if definition == "model":
            return lay["reap"] / np.maximum(lay["count"], 1)
        if definition != "softmax":
            raise ValueError(f"REAP definition must be 'model' or 'softmax', got {definition!r}")
        if "reap_softmax" not in lay:
            raise StatsFileError("these statistics were collected before REAP's softmax definition was recorded; "
                                 "collect them again to use the reap-softmax criterion")
        return lay["reap_softmax"] / np.maximum(lay["count_softmax"], 1)

    def check_fits(self, view) -> "RouterStats":
        """Refuse statistics of another model (StatsFileError in words): their per-expert and per-neuron arrays
        would be read with the wrong shapes, or worse, fit by chance and score the wrong experts."""
        mt = self.info.get("model_type")
        problem = None
        if mt and mt != view.text_config.model_type:
            problem = f"they were collected on a {mt} model, this is {view.text_config.model_type}"
        elif list(self.num_experts) != list(view.num_experts):
            problem = f"their experts per MoE layer are {list(self.num_experts)}, the model's {view.num_experts}"
        elif self.moe_layer_indices and list(self.moe_layer_indices) != [lay.layer_idx for lay in view]:
            problem = (f"their MoE layers sit at decoder layers {list(self.moe_layer_indices)}, the model's at "
                       f"{[lay.layer_idx for lay in view]}")
        else:
            for lay, st in zip(view, self.layers):
                for key, width, what in (("neuron_sq", lay.intermediate_size, "neurons per expert"),
                                         ("in_sq", lay.hidden_size, "hidden size")):
                    got = np.shape(st.get(key, np.zeros((0, width))))[-1]
                    if got != width:
                        problem = f"MoE layer {lay.index}: their {what} is {got}, the model's {width}"
                        break
                if problem:
                    break
        if problem:
            raise StatsFileError(f"these statistics do not belong to this model: {problem}. Collect statistics on "
                                 "this model (`python -m explorer stats`).")
        return self

    def mean_entropy(self, layer: int) -> float:
        return float(self.layers[layer]["entropy_sum"] / max(self.layers[layer]["tokens"], 1))

    def balance(self, layer: int) -> dict:
        p = self.load(layer)
        nz = p[p > 0]
        return {"cv": float(p.std() / max(p.mean(), 1e-12)), "max_over_mean": float(p.max() / max(p.mean(), 1e-12)),
                "entropy": float(-(nz * np.log(nz)).sum()), "entropy_uniform": math.log(len(p))}

    def domain_load(self, layer: int) -> np.ndarray:
        """[D, E] share of each domain's routing slots per expert (rows sum to 1); uniform is 1/E."""
        d = self.layers[layer]["domain_count"]
        return d / np.maximum(d.sum(1, keepdims=True), 1)

    def specialisation(self, layer: int) -> np.ndarray:
        """[D, E] an expert's share of a domain's slots over its share of all slots: >1 means the domain uses it more
        than the rest of the text does. Unlike ``domain_load`` x E, a busy generalist is not called a specialist."""
        overall = self.load(layer)
        return self.domain_load(layer) / np.maximum(overall, 1e-12)[None, :]

    def coactivation_lift(self, layer: int) -> np.ndarray:
        """[E, E] how often two experts are chosen together against chance (independent choices at their loads):
        1 = as often as chance, >1 = a pair the router likes, 0 = never together. Diagonal is NaN."""
        n = max(self.layers[layer]["tokens"], 1)
        p = self.layers[layer]["count"] / n  # probability that a token routes to the expert
        chance = np.outer(p, p)
        lift = self.coactivation(layer) / np.maximum(chance, 1e-12)
        np.fill_diagonal(lift, np.nan)
        return lift

    def coactivation(self, layer: int, normalise: bool = True) -> np.ndarray:
        c = self.layers[layer]["coact"]
        return c / max(self.layers[layer]["tokens"], 1) if normalise else c

    def layer_importance(self) -> np.ndarray:
        """1 − mean cos(h, h + MoE(LN h)) per MoE layer (Layer Drop)."""
        return np.array([1 - lay["layer_cos_sum"] / max(lay["layer_tokens"], 1) for lay in self.layers])

    def block_importance(self) -> np.ndarray:
        """1 − mean cos(X_i, X_{i+1}) per decoder layer (Block Drop)."""
        return 1 - np.asarray(self.block_cos_sum) / max(self.block_tokens, 1)

    def half(self, which: int) -> "RouterStats":
        """The statistics of one half of the calibration blocks (0: even-numbered blocks, 1: odd-numbered), for
        the sums the cheap criteria read (``HALVED``). StatsFileError where they were not recorded."""
        if which not in (0, 1):
            raise ValueError(f"half must be 0 or 1, got {which!r}")
        if not all("half_tokens" in lay for lay in self.layers):
            raise StatsFileError("these statistics were collected before per-half sums were recorded; collect them "
                                 "again to measure how stable the saliency ranking is")
        if any(not 0 < lay["half_tokens"] < lay["tokens"] for lay in self.layers):
            raise StatsFileError("these statistics saw one calibration block, so there are no two halves to compare; "
                                 "collect them on more text (at least two blocks)")
        layers = []
        for lay in self.layers:
            part = {k: lay["half_" + k] for k in HALVED}
            if which == 1:
                part = {k: lay[k] - v for k, v in part.items()}
            layers.append(part)
        return RouterStats(top_k=self.top_k, num_experts=list(self.num_experts), domains=list(self.domains),
                           layers=layers, block_cos_sum=[], block_tokens=0.0,
                           moe_layer_indices=list(self.moe_layer_indices), info={**self.info, "half": which})

    # ---- serialisation --------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {k: getattr(self, k) for k in ("top_k", "num_experts", "domains", "block_cos_sum", "block_tokens",
                                              "moe_layer_indices", "sample_tokens", "sample_routes",
                                              "sample_gates", "info")}

    def to_json(self, path: str | Path | None = None) -> str:
        d = self._meta()
        d["layers"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in lay.items()}
                       for lay in self.layers]
        s = json.dumps(d)
        if path is not None:
            atomic_write(path, s)
        return s

    @classmethod
    def from_json(cls, src: str | Path) -> "RouterStats":
        text = Path(src).read_text() if not str(src).lstrip().startswith("{") else str(src)
        d = json.loads(text)
        d["layers"] = [{k: (np.asarray(v, dtype=np.float64) if k in STORED else v) for k, v in lay.items()}
                       for lay in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """JSON (``.json``) or NPZ (anything else)."""
        path = Path(path)
        if path.suffix == ".json":
            self.to_json(path)
            return
        arrays = {f"{i}/{k}": v for i, lay in enumerate(self.layers) for k, v in lay.items() if k in STORED}
        scal = [{k: lay[k] for k in SCALARS if k in lay} for lay in self.layers]
        buf = io.BytesIO()  # not compressed: float sums barely compress, and zlib took 6 s of a 16 x 64 layer file
        np.savez(buf, __meta__=np.frombuffer(json.dumps({**self._meta(), "scalars": scal}).encode(),
                                                        dtype=np.uint8), **arrays)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load_file(cls, path: str | Path) -> "RouterStats":
        """Statistics written by ``save``; anything else is refused with StatsFileError, never a traceback."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"statistics file not found: {path}")
        if path.is_dir():
            raise StatsFileError(f"{path} is a folder; pass the stats.json or stats.npz that `stats --out` wrote")
        what = f"{path} is not a statistics file written by `python -m explorer stats`"
        try:
            if path.suffix == ".json":
                stats = cls.from_json(path)
            else:
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(bytes(z["__meta__"]).decode())
                    scal = meta.pop("scalars")
                    layers = []
                    for i, sc in enumerate(scal):
                        lay = dict(sc)
                        lay.update({k: z[f"{i}/{k}"] for k in STORED if f"{i}/{k}" in z})
                        layers.append(lay)
                stats = cls(layers=layers, **meta)
        except json.JSONDecodeError as err:
            raise StatsFileError(f"{what}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from err
        except (KeyError, TypeError, AttributeError) as err:
            raise StatsFileError(f"{what}: a required field is missing or malformed ({err})") from err
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise StatsFileError(f"{what}: it cannot be read as JSON or NPZ ({str(err).splitlines()[0]})") from err
        missing = [k for lay in stats.layers for k in ("count", "gate_mass", "tokens") if k not in lay]
        if not stats.layers or missing or len(stats.num_experts) != len(stats.layers):
            raise StatsFileError(f"{what}: its per-layer statistics are missing or inconsistent")
        return stats


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: the accelerator's allocator peak on CUDA, and the peak resident set (RSS)."""
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


class StatsFileError(ExplorerError):
    """A statistics file that cannot be used; the message says why."""


def segment_sums(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weights [G, N] @ rows [N, D] in float32: per-group weighted sums of rows as one matrix product. Half-precision
    rows stay in their dtype (tensor cores, float32 accumulation and result on CUDA); the weights are then rounded
    to it, which is exact for 0/1 and about 3 digits for gate² (as exact as a bf16 model's own numbers)."""
    if rows.dtype in (torch.float32, torch.float64):
        return weights.to(rows.dtype) @ rows
    if rows.is_cuda:
        try:
            return torch.mm(weights.to(rows.dtype), rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            return (weights.to(rows.dtype) @ rows).float()
    return weights @ rows.float()


def _add_rows(acc: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None) -> None:
    """acc [D] (float32) += Σ_n w_n · rows[n] (plain sum where ``w`` is None), accumulated in float32 at least."""
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    if w is None:
        acc.add_(rows.sum(0))
    elif rows.dtype == acc.dtype:
        acc.addmv_(rows.T, w)
    else:
        acc.add_(w.to(rows.dtype) @ rows)


def _square(t: torch.Tensor, scratch: "_Scratch | None" = None) -> torch.Tensor:
    """t² for ``segment_sums``: bf16 stays bf16 on CUDA (its range is float32's); elsewhere float32, written into
    ``scratch`` where given (a fresh tensor of this size costs page faults on every call on a CPU)."""
    if t.is_cuda and t.dtype == torch.bfloat16:
        return t * t
    if scratch is None or t.is_cuda:
        return t.float().square()
    out = scratch.take(t.shape)
    if t.dtype == torch.float32:
        return torch.square(t, out=out)
    return out.copy_(t).square_()


class _Scratch:
    """One float32 CPU buffer reused for the observer's temporaries (x², h², r + o). glibc hands freed blocks of
    this size back to the system, so each fresh one was paid for again in page faults: measured on the demo, 12k
    faults a pass and most of the observer's cost. Only one temporary is taken at a time."""

    def __init__(self):
        self.buf = torch.empty(0)

    def take(self, shape) -> torch.Tensor:
        n = math.prod(shape)
        if self.buf.numel() < n:
            self.buf = torch.empty(n)
        return self.buf[:n].view(shape)


def row_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` [N, D], in float32. ``F.cosine_similarity`` builds
    normalised copies of both: 2.5 ms for [2048, 192] and 47 ms for [4096, 2048] on a 2-core CPU, against 0.1 and 5
    here (one row dot product, two norms; from 512 columns the dot product as a batched product, which writes no
    [N, D] temporary)."""
    a, b = a.float(), b.float()
    dot = torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).flatten() if a.shape[-1] >= 512 else torch.linalg.vecdot(a, b)
    den = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return dot / den.clamp_min(1e-8)


def dense_positions(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` evenly spread positions of real tokens (never padding) in a flattened batch mask."""
    real = valid.reshape(-1).nonzero().flatten()
    if not real.numel():
        return real
    return real[torch.linspace(0, real.numel() - 1, min(n, real.numel())).long()]


class StatsObserver:
    """Accumulates per-layer running sums; called from inside ``MoELayer.combine``."""

    def __init__(self, view: MoEModel, n_domains: int, dense_sample: int = 16, device=None):
        self.view = view
        self.dense_sample = dense_sample
        self.acc: list[dict] = []
        for lay in view:
            E, H, I = lay.num_experts, lay.hidden_size, lay.intermediate_size
            dev = device or lay.device  # the layer's execution device (offloaded weights are on "meta")
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
            zf = lambda *s: torch.zeros(*s, dtype=torch.float32, device=dev)  # noqa: E731
            self.acc.append({
                "count": z(E), "gate_mass": z(E), "gate_routed": z(E), "coact": z(E, E), "domain_count": z(n_domains, E),
                "reap": z(E), "reap_softmax": z(E), "count_softmax": z(E), "out_norm": z(E), "out_sum": zf(E, H),
                "dense_out_sum": zf(E, H), "act_max": zf(E),
                "neuron_sq": zf(E, I), "neuron_sq_gated": zf(E, I), "in_sq": zf(E, H), "in_sq_gated": zf(E, H), "logit_gram": z(E, E),
                "tokens": z(()), "entropy_sum": z(()), "dense_tokens": z(()), "layer_cos_sum": z(()),
                "layer_tokens": z(()), **{"half_" + k: z(E) for k in HALVED if k != "tokens"}, "half_tokens": z(()),
            })
        self.token_domain: torch.Tensor | None = None  # [T] domain index of each token in the current batch
        self.valid: torch.Tensor | None = None  # [T] bool: real token (not padding)
        self.half: torch.Tensor | None = None  # [T] 1.0 for tokens of an even-numbered calibration block, else 0
        self.sample: dict | None = None  # when set, record routes of the first ``sample['n']`` tokens
        self._reap_gates: torch.Tensor | None = None  # [T, E] REAP's gate where its top-k picks an expert, else 0
        self.dense_sel: torch.Tensor | None = None  # positions of this batch's dense sample (set per batch)
        self._dense_x: dict[int, torch.Tensor] = {}  # MoE layer -> this batch's dense sample (experts kept in FP8)
        self._dense_pending: dict[int, list] = {}  # MoE layer -> the batches' dense samples not yet run
        self._pairs: list[tuple] = []  # this layer's (expert(s), tok, gate, output norm, max, min) per kernel call
        self.padded = True  # some token of the current batch is padding (False: every per-pair weight is 1)
        self._scratch = _Scratch()

    def _reap_softmax(self, lay: MoELayer, a: dict, x, p, idx, v) -> torch.Tensor | None:
        """REAP's definition (its observer): softmax over all experts, its own top-k, renormalised over it. Where
        that top-k picks what the model routed, the expert outputs of the routed pass are reused (in ``expert`` /
        ``experts``); pairs the model did not route (sigmoid or biased routers) run once more here. For softmax
        top-k routers REAP's top-k is the routed set, so no pair is looked for (and the device never waits).
        ``p``: the softmax over all experts of the router logits. Returns REAP's picks as 0/1 [T, E], or None
        where they are the routed set."""
        if lay.family.gating in ("softmax_topk", "topk_softmax"):
            vals = p.gather(1, idx)
            self._reap_gates = torch.zeros_like(p).scatter_(1, idx, vals / vals.sum(-1, keepdim=True).clamp_min(1e-30))
            return None
        vals, ridx = p.topk(idx.shape[1], dim=-1)
        gates = torch.zeros_like(p).scatter_(1, ridx, vals / vals.sum(-1, keepdim=True).clamp_min(1e-30))
        self._reap_gates = gates
        routed = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
        tok, eid = ((gates > 0) & ~routed).nonzero(as_tuple=True)
        if tok.numel():
            one = torch.ones(tok.numel(), 1, dtype=x.dtype, device=x.device)
            y = lay.combine(x[tok], one, eid[:, None])  # f_e(x) of these pairs, seen by no observer
            add = gates[tok, eid] * y.float().norm(dim=-1) * v[tok]
            a["reap_softmax"].index_add_(0, eid, add.double())
            a["half_reap_softmax"].index_add_(0, eid, (add * self._half(v)[tok]).double())
        return (gates > 0).float()

    def begin(self, lay: MoELayer, x, logits, w, idx) -> None:
        a = self.acc[lay.index]
        valid = (self.valid.to(x.device) if self.valid is not None
                 else torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        v = valid.to(torch.float32)  # per-token work in float32; the running sums are float64
        E = lay.num_experts
        soft = torch.softmax(logits.float(), dim=-1)  # once: REAP's and (softmax routers) the router's distribution
        picked = self._reap_softmax(lay, a, x, soft, idx, v)
        p = lay.probs(logits.float()) if lay.family.gating in ("sigmoid_group", "sigmoid_input") else soft
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1, keepdim=True)
        onehot = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device).scatter_(1, idx, 1.0)
        gw = torch.zeros_like(onehot).scatter_(1, idx, w.float())
        # every per-token sum, over all real tokens and over the first calibration half, as one product
        feats = [p, onehot, gw, onehot if picked is None else picked, ent, torch.ones_like(ent)]
        sums = (torch.stack([v, self._half(v)]) @ torch.cat(feats, dim=1)).double()
        for j, key in enumerate(("gate_mass", "count", "gate_routed", "count_softmax")):
            a[key] += sums[0, j * E:(j + 1) * E]
            if key != "gate_routed":
                a["half_" + key] += sums[1, j * E:(j + 1) * E]
        a["entropy_sum"] += sums[0, 4 * E]
        a["tokens"] += sums[0, 4 * E + 1]
        a["half_tokens"] += sums[1, 4 * E + 1]
        if self.padded:
            onehot, gw = onehot * v[:, None], gw * v[:, None]
        # Σ over an expert's routed tokens of its input squared, plain and weighted by gate² (MoE-Pruner): per token,
        # not per pair, so k times fewer rows; gate-on-input families feed the expert x·g
        g2 = gw * gw
        wts = torch.cat([g2, g2 * g2] if lay.family.gating == "sigmoid_input" else [onehot, g2], dim=1)
        sq = segment_sums(wts.T, _square(x, self._scratch))
        a["in_sq"] += sq[:E]
        a["in_sq_gated"] += sq[E:]
        co = onehot.T @ onehot
        co.fill_diagonal_(0)
        a["coact"] += co.double()
        if self.token_domain is not None:
            a["domain_count"].index_add_(0, self.token_domain.to(x.device), onehot.double())
        lg = logits.float() * v[:, None] if self.padded else logits.float()
        a["logit_gram"] += (lg.T @ lg).double()
        sel = self.dense_sel if self.dense_sample else None
        if sel is None and self.dense_sample:
            sel = dense_positions(valid.cpu(), self.dense_sample).to(x.device)
        self._dense_x.pop(lay.index, None)
        if sel is not None and sel.numel():
            if lay.fp8_kept:  # each expert on the sample while the loop holds it dequantised (see ``expert``)
                xs = x[sel]
                self._dense_x[lay.index] = xs
                for e in (torch.bincount(idx.reshape(-1), minlength=E) == 0).nonzero().flatten().tolist():
                    a["dense_out_sum"][e] += lay.expert(e, xs).float().sum(0)  # routed nowhere in this batch
            else:  # run once per layer on every batch's sample (``flush_dense``): the experts' weights are read once
                self._dense_pending.setdefault(lay.index, []).append(x[sel])
            a["dense_tokens"] += sel.numel()
        if self.sample is not None and self.sample.get("pending", {}).get(lay.index):
            n = self.sample["n"]
            self.sample["routes"][lay.index] = idx[:n].tolist()
            self.sample["gates"][lay.index] = [[round(float(g), 4) for g in row] for row in w[:n]]
            self.sample["pending"][lay.index] = False

    def flush_dense(self, lay: MoELayer, chunk: int = 64) -> None:
        """Every expert on the dense samples gathered for this layer, ``chunk`` tokens at a time: a batch's 16 tokens
        alone made every expert's weights stream through memory once per batch (1.1 s of a 5 s pass on two OLMoE
        layers). Called while the layer's weights are loaded (after its last batch)."""
        xs = self._dense_pending.pop(lay.index, None)
        if not xs:
            return
        x = torch.cat(xs)
        a = self.acc[lay.index]
        with materialized(lay.experts):  # offloaded by accelerate: brought in, as the block's forward does
            for i in range(0, x.shape[0], chunk):
                a["dense_out_sum"] += lay.dense_experts(x[i:i + chunk]).float().sum(1)

    def expert(self, lay: MoELayer, e: int, tok, g, xin, h, y) -> None:
        """One expert's routed pairs (the loop kernel): its rows of the vector sums, added in place; the per-pair
        scalars wait for ``end``. Called once per expert, so every operation here counts E times a layer."""
        a = self.acc[lay.index]
        xs = self._dense_x.get(lay.index)
        if xs is not None and lay.fp8_kept:
            a["dense_out_sum"][e] += lay.expert(e, xs).float().sum(0)
        gf = g.float()
        v = self._valid_of(tok, g) if self.padded else None  # None: every pair is a real token's
        g2 = gf * gf if v is None else gf * gf * v
        _add_rows(a["out_sum"][e], y, v)
        h2 = _square(h, self._scratch)
        _add_rows(a["neuron_sq"][e], h2, v)
        _add_rows(a["neuron_sq_gated"][e], h2, g2)
        self._keep_pairs(e, tok, g, y)

    def experts(self, lay: MoELayer, eid, tok, g, xin, h, y) -> None:
        """All routed pairs at once (the grouped kernel): per-expert sums as one product with an [E, pairs] weight
        matrix on the device (tensor cores in bf16, no atomics, no host sync)."""
        E, P = lay.num_experts, eid.numel()
        v = self._valid_of(tok, g)
        plain = torch.zeros(E, P, dtype=torch.float32, device=y.device)
        gated = torch.zeros(E, P, dtype=torch.float32, device=y.device)
        pair = torch.arange(P, device=y.device)
        plain[eid, pair] = v
        gated[eid, pair] = g.float() ** 2 * v
        a = self.acc[lay.index]
        a["out_sum"] += segment_sums(plain, y)
        sq = segment_sums(torch.cat([plain, gated]), _square(h))
        a["neuron_sq"] += sq[:E]
        a["neuron_sq_gated"] += sq[E:]
        self._keep_pairs(eid, tok, g, y)

    def _keep_pairs(self, e, tok, g, y) -> None:
        """Each pair's output norm and extremes, summed per expert in ``end``: once per layer rather than a dozen
        small operations per expert (most of the pass's overhead on a CPU)."""
        norm = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
        self._pairs.append((e, tok, g, norm, y.amax(-1), y.amin(-1)))  # |y|_inf: its own kernel is ~15x slower

    def _half(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [T] kept on the tokens of the even-numbered calibration blocks, zero elsewhere."""
        return v * self.half.to(v.device, v.dtype) if self.half is not None else v

    def _valid_of(self, tok, g) -> torch.Tensor:
        return (self.valid.to(tok.device)[tok].to(torch.float32) if self.valid is not None
                else torch.ones_like(g, dtype=torch.float32))

    def end(self, lay: MoELayer) -> None:
        """The per-pair scalars of the layer's pairs, summed per expert in one go: REAP (the model's gates and
        REAP's softmax), output norms, their calibration-half sums and each expert's peak output."""
        if not self._pairs:
            return
        a = self.acc[lay.index]
        es, toks, gs, norms, his, los = zip(*self._pairs)
        self._pairs.clear()
        tok, g, norm = torch.cat(toks), torch.cat(gs), torch.cat(norms)
        if isinstance(es[0], int):  # the loop kernel: one expert per call
            eid = torch.repeat_interleave(torch.tensor(es, device=tok.device),
                                          torch.tensor([t.numel() for t in toks], device=tok.device))
        else:
            eid = torch.cat(es)
        peak = torch.maximum(torch.cat(his), -torch.cat(los)).float()
        v = self._valid_of(tok, norm)
        nv = norm * v
        reap, reap_sm = g.float() * nv, self._reap_gates[tok, eid] * nv
        hp = self.half.to(norm.device)[tok] if self.half is not None else torch.ones_like(norm)
        per_pair = torch.stack([reap, reap_sm, nv, reap * hp, reap_sm * hp], dim=1).double()
        sums = torch.zeros(lay.num_experts, 5, dtype=torch.float64, device=norm.device).index_add_(0, eid, per_pair)
        a["reap"] += sums[:, 0]
        a["reap_softmax"] += sums[:, 1]
        a["out_norm"] += sums[:, 2]
        a["half_reap"] += sums[:, 3]
        a["half_reap_softmax"] += sums[:, 4]
        a["act_max"].scatter_reduce_(0, eid, peak * v, reduce="amax")

    def layer_cos(self, lay: MoELayer, resid: torch.Tensor, out: torch.Tensor) -> None:
        a = self.acc[lay.index]
        r = resid.reshape(-1, resid.shape[-1]).float()
        o = out.reshape(-1, out.shape[-1])
        c = row_cos(r, r + o if r.is_cuda else torch.add(r, o, out=self._scratch.take(r.shape)))
        v = self.valid.to(c.device, c.dtype) if self.valid is not None else torch.ones_like(c)
        a["layer_cos_sum"] += (c * v).sum().double()
        a["layer_tokens"] += v.sum().double()


def collect_stats(model, view: MoEModel, blocks: TokenBlocks, batch_size: int = 8, dense_sample: int = 16,
                  sample_tokens: int = 64, progress=None) -> RouterStats:
    """One hooked forward pass over ``blocks``; returns a :class:`RouterStats`.

    dense_sample: tokens per batch on which every expert runs, for HC-SMoE's mean output over all tokens
    (0 turns it off; the per-expert mean over routed tokens is always there). progress: callable(done, total).
    """
    device = input_device(model)
    engine = engine_of(model)
    obs = StatsObserver(view, len(blocks.domains), dense_sample=dense_sample,
                        device=engine.device if engine is not None else None)
    n_dec = len(view.decoder_layers)
    block_cos = torch.zeros(n_dec, dtype=torch.float64, device=device)
    block_tok = torch.zeros((), dtype=torch.float64, device=device)
    resid: dict[int, torch.Tensor] = {}

    def pre_block(i):
        def hook(mod, args, kwargs):
            resid[("in", i)] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_block(i):
        def hook(mod, args, kwargs, out):
            xi = resid.pop(("in", i))
            xo = out[0] if isinstance(out, tuple) else out
            c = row_cos(xi.reshape(-1, xi.shape[-1]), xo.reshape(-1, xo.shape[-1]))
            v = obs.valid.to(c.device, c.dtype)
            if c.numel() != v.numel() and c.numel() % v.numel() == 0:  # several residual streams (hyper-connections)
                c = c.reshape(v.numel(), -1).mean(-1)
            block_cos[i] += (c * v).sum().double().to(block_cos.device)
        return hook

    def pre_norm(i):
        def hook(mod, args):
            resid[("h", i)] = args[0]
        return hook

    hooks = [spec for i, dl in enumerate(view.decoder_layers)
             for spec in ((dl, "pre", pre_block(i), True), (dl, "post", post_block(i), True))]
    for lay in view:
        norm = getattr(lay.decoder_layer, "post_attention_layernorm", None)
        if norm is not None:
            hooks.append((norm, "pre", pre_norm(lay.layer_idx)))

    def fwd(lay: MoELayer, hs):
        out = lay.forward(hs, observer=obs)
        h = resid.pop(("h", lay.layer_idx), None)
        if h is not None:
            o = out[0] if isinstance(out, tuple) else out
            obs.layer_cos(lay, h, o)
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = list(blocks.batches(batch_size))
    mine = processes.share(len(batches))  # one process: all; under torchrun: this process's contiguous share
    sample = ({"n": min(sample_tokens, int(batches[0].lengths[0])), "routes": [None] * len(view),
               "gates": [None] * len(view), "pending": {i: True for i in range(len(view))}}
              if sample_tokens and batches else None)

    first = np.cumsum([0] + [len(b) for b in batches])  # the calibration index of each batch's first block

    def before(bi: int) -> None:  # the observer's state for the batch about to run (in any layer)
        bi = mine[bi]
        b = batches[bi]
        am = b.attention_mask()
        obs.valid = am.reshape(-1).bool().to(device)
        obs.padded = not bool(am.all())  # read on the host's copy: no device sync
        even = (torch.arange(len(b)) + int(first[bi])) % 2 == 0
        obs.half = even[:, None].expand(-1, b.block_len).reshape(-1).to(device, torch.float32)
        obs.dense_sel = dense_positions(am.bool(), dense_sample).to(device) if dense_sample else None
        obs.token_domain = b.domain[:, None].expand(-1, b.block_len).reshape(-1).to(device)
        obs.sample = sample if bi == 0 else None

    t0 = time.perf_counter()
    with torch.inference_mode(), forward_hooks(*hooks), view.patched(fwd):
        for bi, b, _ in forward_batches(model, [batches[i] for i in mine], before, logits=False,
                                        progress=progress if processes.is_main() else None,
                                        after_layer=lambda i: [obs.flush_dense(lay) for lay in view
                                                               if lay.layer_idx == i]):
            block_tok += b.attention_mask().sum().double()
    obs.sample = None
    processes.add([block_cos, block_tok] + [v for a in obs.acc for k, v in a.items() if k != "act_max"])
    processes.add([a["act_max"] for a in obs.acc], op="max")
    sample = processes.from_main(sample)  # the routing sample is the first batch's: the main process ran it

    layers = [{k: (v.item() if v.dim() == 0 else v.cpu().double().numpy()) for k, v in a.items()} for a in obs.acc]
    stats = RouterStats(
        top_k=view.top_k, num_experts=view.num_experts, domains=list(blocks.domains), layers=layers,
        block_cos_sum=block_cos.cpu().tolist(), block_tokens=float(block_tok), moe_layer_indices=[l.layer_idx for l in view],
        info={"blocks": len(blocks), "block_len": blocks.block_len, "tokens": int(blocks.lengths.sum()),
              "dense_sample": dense_sample, "model_type": view.text_config.model_type,
              "seconds": time.perf_counter() - t0, "batch_size": batch_size, **peak_memory(device),
              **({"processes": processes.group().get_world_size()} if processes.group() else {})},
    )
    if sample is not None:
        stats.sample_tokens = blocks.input_ids[0, : sample["n"]].tolist()
        stats.sample_routes = sample["routes"]
        stats.sample_gates = sample["gates"]
    return stats


def token_routes(model, view: MoEModel, tokenizer, text: str, max_tokens: int = 512) -> dict:
    """Each token's top-k experts and gates in every MoE layer, for a token strip."""
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if not ids:
        raise ValueError("type some text to see its routing")
    routes: list = [None] * len(view)
    gates: list = [None] * len(view)

    def fwd(lay, hs):
        x = hs.reshape(-1, hs.shape[-1])
        logits, w, idx = lay.route(x)
        order = torch.argsort(w, dim=-1, descending=True)
        routes[lay.index] = idx.gather(1, order).tolist()
        gates[lay.index] = w.gather(1, order).float().tolist()
        return lay.forward(hs)

    device = input_device(model)
    with torch.inference_mode(), view.patched(fwd):
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return {"tokens": [tokenizer.decode([t]) for t in ids], "ids": ids, "routes": routes, "gates": gates}


@dataclass
class VocabRouting:
    """Which experts each token id goes to (OLMoE's vocabulary specialisation), from one pass over some text.

    Kept as the raw (position -> token id, experts) pairs: a few thousand tokens make a small array, and the
    shuffled-ids baseline needs them."""
    ids: np.ndarray  # [N] token id at each scored position
    routes: list  # [L] of [N, k] expert ids
    num_experts: list[int]

    def _counts(self, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        uniq, inv = np.unique(ids, return_inverse=True)
        r = self.routes[layer]
        E = self.num_experts[layer]
        counts = np.zeros((len(uniq), E))
        np.add.at(counts, (np.repeat(inv, r.shape[1]), r.reshape(-1)), 1)
        return uniq, counts, np.bincount(inv, minlength=len(uniq))

    def token_share(self, layer: int, min_count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, [V, E] share of each id's occurrences routed to each expert, occurrences) for ids seen
        ``min_count`` times. A row sums to top-k; 1.0 means every occurrence of the token goes to that expert."""
        uniq, counts, occ = self._counts(layer, self.ids)
        keep = occ >= min_count
        return uniq[keep], counts[keep] / occ[keep][:, None], occ[keep]

    def concentration(self, layer: int, min_count: int = 5, shuffled: bool = False, seed: int = 0) -> float:
        """Occurrence-weighted mean, over token ids seen ``min_count`` times, of how often an id goes to its
        favourite expert (OLMoE's vocabulary specialisation). ``shuffled``: the same with ids shuffled over
        positions, i.e. what routing that ignores the token id would give (chance, small-sample noise included)."""
        ids = np.random.default_rng(seed).permutation(self.ids) if shuffled else self.ids
        uniq, counts, occ = self._counts(layer, ids)
        keep = occ >= min_count
        if not keep.any():
            raise ValueError(f"no token id occurs {min_count} times in this text: use more text or a lower min_count")
        best = counts[keep].max(1) / occ[keep]
        return float((best * occ[keep]).sum() / occ[keep].sum())


def vocab_routing(model, view: MoEModel, blocks: TokenBlocks, batch_size: int = 8,
                  max_tokens: int | None = 8192) -> VocabRouting:
    """Route ``blocks`` (up to ``max_tokens`` real tokens) and keep every position's token id and top-k experts."""
    ids_all: list[np.ndarray] = []
    routes: list[list[np.ndarray]] = [[] for _ in view]
    mask_now: dict = {}

    def fwd(lay, hs):
        x = hs.reshape(-1, hs.shape[-1])
        _, _, idx = lay.route(x)
        routes[lay.index].append(idx[mask_now["m"]].cpu().numpy())
        return lay.forward(hs)

    device = input_device(model)
    seen = 0
    with torch.inference_mode(), view.patched(fwd):
        for b in blocks.batches(batch_size):
            am = b.attention_mask()
            mask_now["m"] = am.reshape(-1).bool().to(device)
            model(input_ids=b.input_ids.to(device), attention_mask=am.to(device), use_cache=False)
            ids_all.append(b.input_ids.reshape(-1)[am.reshape(-1).bool()].numpy())
            seen += int(am.sum())
            if max_tokens and seen >= max_tokens:
                break
    if not ids_all:
        raise ValueError("no text to route: the calibration split is empty")
    return VocabRouting(np.concatenate(ids_all), [np.concatenate(r) for r in routes], list(view.num_experts))

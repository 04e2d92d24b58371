"""Quick distillation of a compressed student from its teacher, streamed as events.

``Distiller.run()`` is a generator: every step yields a ``DistillEvent`` (loss parts, per-layer router KL, expert
load drift, learning rate, tokens/s, elapsed) and every ``eval_every`` steps one with held-out perplexity per
domain. The app, the notebook widgets and the CLI all consume the same events. ``stop()`` ends a run at the next
step; calling ``run()`` again resumes with the same optimiser state. The best student so far (by evaluation
perplexity) is kept and can be restored. The same seed gives the same result.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import ExplorerError
from .apply import apply_plan
from .data import TokenBlocks
from .devices import forward_hooks
from .moe import MoEModel
from .perplexity import block_nll, fmt_ppl, perplexity, summarise
from .plan import Plan
from .sharding import inference

KL_KINDS = ("forward", "reverse", "jsd")
TRAINABLE = ("all", "experts-routers", "routers")


def recovered(teacher_ppl: float, cut_ppl: float, student_ppl: float) -> float | None:
    """Share of the perplexity the cut lost that distillation won back (1 = back to the teacher); None if the cut
    lost nothing."""
    gap = cut_ppl - teacher_ppl
    return None if gap <= 0 else (cut_ppl - student_ppl) / gap


class DistillError(ExplorerError):
    """Refused before anything runs (bad settings), or a run that went non-finite."""


@dataclass
class DistillConfig:
    # defaults measured on the demo model (25% REAP drop, 2,048 tokens per domain): 80 steps at 5e-4 with 10 steps
    # of warm-up win back about 80% of the lost perplexity in under a minute on 2 CPU cores
    steps: int = 80
    lr: float = 5e-4
    batch_size: int = 8
    temperature: float = 1.0
    kl: str = "forward"  # forward KL(teacher‖student), reverse KL(student‖teacher), or jsd
    hidden_mse: float = 0.0  # weight of the hidden-state MSE on matching layers
    expert_kd: float = 0.0  # weight of expert-wise distillation (MoE-Pruner)
    train: str = "all"  # all | experts-routers | routers
    eval_every: int = 10
    eval_tokens: int | None = None  # cap per domain of the evaluation split (None: all of it)
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    teacher_topk_cache: int | None = None  # cache the teacher's top-k logits once; the teacher then skips its passes

    def validate(self) -> "DistillConfig":
        for name in ("hidden_mse", "expert_kd", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DistillError(f"{name.replace('_', ' ')} must be a finite number, got {v!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1_000_000:
            raise DistillError(f"steps must be an integer in [1, 1000000], got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 1.0):
            raise DistillError(f"learning rate must be in (0, 1], got {self.lr!r}")
        if not 0 < self.temperature <= 100:
            raise DistillError(f"temperature must be in (0, 100], got {self.temperature}")
        if self.kl not in KL_KINDS:
            raise DistillError(f"the KL kind must be one of {', '.join(KL_KINDS)}, got {self.kl!r}")
        if self.train not in TRAINABLE:
            raise DistillError(f"what to train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if self.batch_size < 1:
            raise DistillError(f"the batch size (blocks per step) must be at least 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise DistillError(f"'evaluate every' must be at least 1 step, got {self.eval_every}")
        if self.hidden_mse < 0 or self.expert_kd < 0:
            raise DistillError("loss weights must be non-negative")
        if self.teacher_topk_cache is not None and self.teacher_topk_cache < 1:
            raise DistillError("the teacher's top-k cache must keep at least 1 logit per token")
        return self


@dataclass
class DistillEvent:
    kind: str  # "start" | "step" | "eval" | "stopped" | "done" | "error"
    step: int
    tokens: int = 0
    loss: float | None = None
    parts: dict = field(default_factory=dict)  # kl, hidden, expert
    router_kl: list = field(default_factory=list)  # per student MoE layer
    load_drift: list = field(default_factory=list)  # per student MoE layer, total variation vs teacher
    lr: float = 0.0
    tokens_per_s: float = 0.0
    elapsed: float = 0.0
    eta: float | None = None
    ppl: float | None = None
    ppl_domains: dict = field(default_factory=dict)
    best_ppl: float | None = None
    stage: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, kind: str = "forward",
            temperature: float = 1.0, teacher_index: torch.Tensor | None = None) -> torch.Tensor:
    """KL between softened distributions, scaled by τ², averaged over masked tokens.

    With ``teacher_index`` the teacher is given by its top-k logits only (cached): its distribution is taken over
    those k tokens, renormalised, and compared with the student's log-probabilities there.
    """
    t = temperature
    ls = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_index is not None:  # a true KL on the teacher's top-k support: both renormalised there
        lt = F.log_softmax(teacher_logits.float() / t, dim=-1)
        ls = ls.gather(-1, teacher_index)
        ls = ls - torch.logsumexp(ls, dim=-1, keepdim=True)
    else:
        lt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    pt, ps = lt.exp(), ls.exp()
    if kind == "forward":
        per = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse":
        per = (ps * (ls - lt)).sum(-1)
    else:
        lm = torch.log(0.5 * (pt + ps) + 1e-30)
        per = 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
    m = mask.float()
    return (per * m).sum() / m.sum().clamp_min(1) * t * t


def _trainable(student, view: MoEModel | None, which: str) -> list[torch.nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(which == "all")
    if which == "all":
        return [p for p in student.parameters()]
    chosen = []
    for lay in view or []:
        mods = [lay.router_linear] + ([lay.experts] if which == "experts-routers" else [])
        for m in mods:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                chosen.append(p)
    if not chosen:
        raise DistillError(f"nothing to train with train={which!r}: the student has no MoE layers left")
    return chosen


class Distiller:
    """Teacher (the model before the plan, frozen) → student (the plan applied)."""

    def __init__(self, teacher, teacher_view: MoEModel, student, student_view: MoEModel | None, plan: Plan,
                 train_blocks: TokenBlocks, eval_blocks: TokenBlocks, config: DistillConfig | None = None,
                 accelerator=None, shard: bool = False):
        """``accelerator`` (accelerate's, under ``accelerate launch``): the student trains as DDP, each process on
        its share of every batch (the same global batch as one process), evaluation is split over the processes
        and summed, and every process sees the same events; only the main process should print or save.
        ``shard``: FSDP2 instead of DDP (``explorer.sharding``): student and teacher sharded across the processes,
        each process evaluating every block; ``final_model`` must then be called by every process."""
        self.config = (config or DistillConfig()).validate()
        if len(train_blocks) < 1 or train_blocks.tokens < 1:
            raise DistillError("no training text: the calibration split is empty")
        self.teacher, self.tview = teacher.eval(), teacher_view
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student, self.sview, self.plan = student, student_view, plan
        from .ops.quantise import train_on_grid

        # a quantise plan's student trains on its grid (straight-through): the student measured is the one exported
        self.on_grid = train_on_grid(student, plan, student_view)
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks.limit(self.config.eval_tokens)
        self.device = next(student.parameters()).device
        self.params = _trainable(student, student_view, self.config.train)
        self.acc = accelerator
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        if self.world > 1 and self.config.batch_size < self.world:
            raise DistillError(f"batch size {self.config.batch_size} is smaller than the {self.world} processes")
        self.sharded, self._shell = shard, None
        if shard:
            self._shard(accelerator)
        self.opt = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.train_model = student  # what the forward runs: the DDP wrapper under a launcher, the student itself else
        if accelerator is not None and not shard:
            self.train_model, self.opt = accelerator.prepare(student, self.opt)
        self.gen = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self._stop = False
        self.history: list[DistillEvent] = []
        self.best_ppl: float | None = None
        self.best_state: dict | None = None
        self.best_step = 0  # the step whose weights ``best_state`` holds (0: the cut model before training)
        self.initial_ppl: float | None = None
        self._order: list[int] = []
        self.cache = self._cache_teacher() if self.config.teacher_topk_cache else None
        self._map = self._layer_map()
        self.layout: dict | None = None

    # ---- set-up -----------------------------------------------------------------------------------------
    def _shard(self, accelerator) -> None:
        from . import sharding

        if accelerator is None:
            raise DistillError("--shard needs a launcher: start with torchrun or accelerate launch")
        why = ("a quantise plan's student trains on its grid through parametrisations FSDP2 does not shard here"
               if self.on_grid else "expert-wise distillation reads the experts' weights outside a forward, where a "
               "sharded process holds only its rows" if self.config.expert_kd > 0 else None)
        if why:
            raise DistillError(f"--shard cannot train this: {why}; leave out --shard (DDP) for it")
        self._shell = sharding.skeleton(self.student) if self.rank == 0 else None
        mesh = sharding.mesh_for(torch.device(accelerator.device))
        sharding.shard(self.student, mesh)
        sharding.shard(self.teacher, mesh)
        self.device = torch.device(accelerator.device)
        self.params = [p for p in self.student.parameters() if p.requires_grad]  # FSDP2 replaced them

    @classmethod
    def from_plan(cls, teacher, teacher_view: MoEModel, plan: Plan, train_blocks, eval_blocks,
                  config: DistillConfig | None = None, stats=None, accelerator=None,
                  shard: bool = False) -> "Distiller":
        config = (config or DistillConfig()).validate()  # refuse bad settings before building anything
        student, sview, layout = apply_plan(teacher, teacher_view, plan, stats=stats)
        d = cls(teacher, teacher_view, student, sview, plan, train_blocks, eval_blocks, config, accelerator, shard)
        d.layout = layout  # what export needs when a stock config cannot describe the student
        return d

    def _layer_map(self) -> list[tuple[int, int, list[int], list[list[int]]]]:
        """(student MoE layer, teacher MoE layer, kept teacher experts in student order, groups)."""
        if self.sview is None:
            return []
        out = []
        for s_lay, t_i in zip(self.sview, self.plan.surviving_layers(self.tview)):
            kept = self.plan.kept(t_i, self.tview[t_i].num_experts)
            groups = {g[0]: g for g in self.plan.merge.get(t_i, [])}  # the groups alone: no weights needed
            out.append((s_lay.index, t_i, kept, [groups.get(e, [e]) for e in kept]))
        return out

    def teacher_memory(self) -> dict:
        """Bytes the teacher's full logits for the training split would take, against the top-k cache."""
        n = int(self.train_blocks.lengths.sum())
        v = self.teacher.config.get_text_config().vocab_size
        full = n * v * 4
        k = self.config.teacher_topk_cache or 0
        return {"full_logits_bytes": full, "topk_cache_bytes": n * k * (4 + 8), "tokens": n, "vocab": v, "k": k}

    def _cache_teacher(self) -> dict:
        k = self.config.teacher_topk_cache
        vals, idx = [], []
        with inference(self.teacher):
            for b in self.train_blocks.batches(self.config.batch_size):
                lg = self.teacher(input_ids=b.input_ids.to(self.device),
                                  attention_mask=b.attention_mask().to(self.device), use_cache=False).logits
                v, i = torch.topk(lg.float(), k, dim=-1)
                vals.append(v.cpu())
                idx.append(i.cpu())
        return {"values": torch.cat(vals), "index": torch.cat(idx)}

    # ---- control ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop = True

    def restore_best(self) -> None:
        if self.best_state is not None:
            from .sharding import restore

            restore(self.student, self.best_state)

    def _snapshot(self) -> dict:
        from .sharding import snapshot

        return snapshot(self.student)

    def final_model(self):
        """The best student as it is exported: on a quantise plan's grid, its weights written as plain parameters
        (a copy; the student itself can go on training). Sharded: gathered whole on the main process (every process
        calls this; the others get None)."""
        self.restore_best()
        if self.sharded:
            from .sharding import gathered

            return gathered(self.student, self._shell, self.rank == 0)
        if not self.on_grid:
            return self.student
        from .ops.quantise import baked

        return baked(self.student)

    def evaluate(self) -> dict:
        self.student.eval()
        if self.world == 1 or self.sharded:  # sharded: every process runs every block (each forward gathers)
            res = perplexity(self.student, self.eval_blocks, batch_size=self.config.batch_size)
        else:  # each process scores its share of the blocks; the sums are exchanged, so all agree
            n = len(self.eval_blocks)
            mine = list(range(self.rank, n, self.world))
            nll = torch.zeros(n, dtype=torch.float64)
            cnt = torch.zeros(n, dtype=torch.float64)
            if mine:
                s_, c_ = block_nll(self.student, self.eval_blocks.subset(mine), self.config.batch_size)
                nll[mine], cnt[mine] = s_, c_.double()
            both = self._all_sum(torch.stack([nll, cnt]))
            res = summarise(self.eval_blocks, both[0], both[1].long())
        return {"ppl": res.ppl, "domains": {k: v["ppl"] for k, v in res.per_domain.items()}}

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the processes (identity in one process)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.to(self.device).clone()
        dist.all_reduce(out)
        return out.cpu()

    def _next_batch(self) -> torch.Tensor:
        """This process's rows of the next global batch (every process draws the same seeded order)."""
        need = self.config.batch_size
        while len(self._order) < need:
            self._order += torch.randperm(len(self.train_blocks), generator=self.gen).tolist()
        rows, self._order = self._order[:need], self._order[need:]
        return torch.tensor(rows[self.rank::self.world])

    def _lr(self) -> float:
        c = self.config
        warm = min(1.0, (self.step + 1) / c.warmup) if c.warmup else 1.0
        return c.lr * warm

    # ---- one step ---------------------------------------------------------------------------------------
    def _losses(self, rows: torch.Tensor):
        c = self.config
        b = self.train_blocks.subset(rows)
        ids = b.input_ids.to(self.device)
        am = b.attention_mask().to(self.device)
        need_hidden = c.hidden_mse > 0
        # with the teacher's top-k logits cached, the teacher runs only when a hidden-state or expert-wise loss needs
        # it: router KL and load drift are then not reported (they would cost the teacher pass the cache saves)
        need_router = self.sview is not None and (self.cache is None or c.expert_kd > 0)
        t_inputs: dict[int, torch.Tensor] = {}
        capture = ([(self.tview[t_i].block, "pre", lambda m, a, _i=t_i: t_inputs.__setitem__(_i, a[0].detach()))
                    for _, t_i, _, _ in self._map] if c.expert_kd > 0 and self.sview is not None else [])
        t_hidden = t_router = t_logits = None
        if self.cache is None or need_hidden or need_router or capture:
            with torch.no_grad(), forward_hooks(*capture):
                tout = self.teacher(input_ids=ids, attention_mask=am, use_cache=False,
                                    output_hidden_states=need_hidden, output_router_logits=need_router)
            t_logits = tout.logits
            t_hidden = tout.hidden_states if need_hidden else None
            t_router = getattr(tout, "router_logits", None) if need_router else None
        self.student.train()
        s_router: list = []
        # the student's router logits come from hooks: its aux loss may not exist for per-layer counts
        with forward_hooks(*[(lay.router, "post", lambda m, a, o, _l=lay: s_router.append(_l.logits_of(o)))
                             for lay in (self.sview or [])]):
            sout = self.train_model(input_ids=ids, attention_mask=am, use_cache=False,
                                    output_hidden_states=need_hidden)
        sout.student_router = s_router
        mask = am[:, 1:].bool()  # predict token t+1 from its prefix: the same positions perplexity scores
        if self.cache is not None:
            tv = self.cache["values"][rows].to(self.device)[:, :-1]
            ti = self.cache["index"][rows].to(self.device)[:, :-1]
            kl = kd_loss(sout.logits[:, :-1], tv, mask, c.kl, c.temperature, teacher_index=ti)
        else:
            kl = kd_loss(sout.logits[:, :-1], t_logits[:, :-1], mask, c.kl, c.temperature)
        parts = {"kl": kl}
        total = kl
        if need_hidden:
            keep = self.plan.kept_blocks(len(self.tview.decoder_layers))
            m = am.bool()
            hs = [F.mse_loss(sout.hidden_states[j + 1][m].float(), t_hidden[t + 1][m].float())
                  for j, t in enumerate(keep[:-1])]
            hid = torch.stack(hs).mean() if hs else kl * 0
            parts["hidden"] = hid
            total = total + c.hidden_mse * hid
        if c.expert_kd > 0 and self.sview is not None and t_router is not None:
            ek = self._expert_kd(t_inputs, t_router, am.reshape(-1).bool())
            parts["expert"] = ek
            total = total + c.expert_kd * ek
        return total, parts, sout, t_router, am

    def _expert_kd(self, t_inputs, t_router, valid) -> torch.Tensor:
        """Each student expert learns its teacher expert(s)' output on the tokens the teacher routed there."""
        losses = []
        for s_i, t_i, kept, groups in self._map:
            tl = self.tview[t_i]
            sl = self.sview[s_i]
            x = t_inputs[t_i].reshape(-1, tl.hidden_size)[valid]
            with torch.no_grad():
                _, _, idx = tl.route(x)
            for j, members in enumerate(groups):
                for e in members:
                    tok = (idx == e).any(-1).nonzero().flatten()
                    if tok.numel() == 0:
                        continue
                    with torch.no_grad():
                        target = tl.expert(e, x[tok])
                    pred = sl.expert(j, x[tok])
                    losses.append(F.mse_loss(pred.float(), target.float()))
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack(losses).mean()

    def _router_metrics(self, t_router, s_router, mask) -> tuple[list, list]:
        if t_router is None or s_router is None:
            return [], []
        valid = mask.reshape(-1).bool()
        rkl, drift = [], []
        with torch.no_grad():
            for (s_i, t_i, kept, groups), sr in zip(self._map, s_router):
                tr = t_router[t_i].float()[valid]
                sr = sr.float()[valid]
                tp = torch.softmax(tr[:, kept], -1)  # teacher restricted to the experts the student kept
                sp = torch.softmax(sr, -1)
                rkl.append(float((tp * (tp.clamp_min(1e-30).log() - sp.clamp_min(1e-30).log())).sum(-1).mean()))
                k = self.tview[t_i].top_k
                t_load = torch.zeros(self.tview[t_i].num_experts, device=tr.device)
                t_load.scatter_add_(0, torch.topk(tr, k, -1).indices.reshape(-1),
                                    torch.ones(tr.shape[0] * k, device=tr.device))
                folded = torch.stack([t_load[g].sum() for g in groups])
                folded = folded / folded.sum().clamp_min(1)
                s_load = torch.zeros(sr.shape[1], device=sr.device)
                s_load.scatter_add_(0, torch.topk(sr, min(k, sr.shape[1]), -1).indices.reshape(-1),
                                    torch.ones(sr.shape[0] * min(k, sr.shape[1]), device=sr.device))
                s_load = s_load / s_load.sum().clamp_min(1)
                drift.append(float(0.5 * (folded - s_load).abs().sum()))
        return rkl, drift

    def divergence(self) -> str | None:
        """A warning in words when the run made the student worse, saying which weights are kept; else None."""
        evals = [e for e in self.history if e.kind == "eval" and e.ppl is not None]
        if not evals or self.initial_ppl is None:
            return None
        last = evals[-1].ppl
        if math.isfinite(last) and last <= 2 * self.initial_ppl and self.best_step > 0:
            return None
        kept = ("the cut model before any training (step 0)" if self.best_step == 0
                else f"those of step {self.best_step} (perplexity {fmt_ppl(self.best_ppl)})")
        what = "diverged" if not math.isfinite(last) or last > 2 * self.initial_ppl else "did not improve"
        return (f"Warning: distillation {what}: perplexity went from {fmt_ppl(self.initial_ppl)} to "
                f"{fmt_ppl(last)}; the weights kept are {kept}. Lower the learning rate or add warm-up.")

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self, steps: int | None = None, stage: int = 0) -> Iterator[DistillEvent]:
        """Yield events until ``steps`` more steps (default: up to config.steps in all) or ``stop()``."""
        c = self.config
        target = self.step + steps if steps is not None else c.steps
        self._stop = False
        if self.step == 0 and self.initial_ppl is None:
            ev = self.evaluate()
            self.initial_ppl = ev["ppl"]
            self.best_ppl = ev["ppl"]
            self.best_state = self._snapshot()
            e = DistillEvent("start", 0, ppl=ev["ppl"], ppl_domains=ev["domains"], best_ppl=ev["ppl"], stage=stage,
                             message="before distillation" + (
                                 "; the quantised weights train on the plan's grid (straight-through), so every "
                                 "perplexity here is the exported model's" if self.on_grid else ""))
            self.history.append(e)
            yield e
        t_run = time.perf_counter()
        base_elapsed, base_step, base_tokens = self.elapsed, self.step, self.tokens
        while self.step < target:
            if self._stop:
                e = DistillEvent("stopped", self.step, self.tokens, elapsed=self.elapsed, best_ppl=self.best_ppl,
                                 stage=stage, message=f"stopped at step {self.step}; start again to resume")
                self.history.append(e)
                yield e
                return
            rows = self._next_batch()
            lr = self._lr()
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss, parts, sout, t_router, am = self._losses(rows)
            mask = am[:, 1:]
            finite = float(self._all_sum(torch.tensor([float(torch.isfinite(loss))]))[0]) == self.world
            bad = None if finite else f"loss became {float(loss.detach())}"
            if bad is None:  # every process takes the same branch (a lone backward would wait forever)
                self.opt.zero_grad(set_to_none=True)
                if self.acc is not None:
                    self.acc.backward(loss)
                else:
                    loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip else float("inf"))
                if self.sharded:
                    from .sharding import full_tensor

                    gn = full_tensor(gn)
                bad = None if torch.isfinite(gn) else "gradients became non-finite"
            if bad is not None:
                self.opt.zero_grad(set_to_none=True)
                e = DistillEvent("error", self.step, self.tokens, stage=stage, best_ppl=self.best_ppl,
                                 message=f"{bad} at step {self.step + 1}: stopped before the update; the student "
                                 "keeps its last good weights (lower the learning rate?)")
                self.history.append(e)
                yield e
                return
            self.opt.step()
            self.step += 1
            if self.world > 1:  # the event reports the global batch: mean loss parts, all tokens
                vals = self._all_sum(torch.tensor([float(mask.sum()), loss.item(), *[v.item() for v in parts.values()]],
                                                  dtype=torch.float64))
                n_tok, loss_v = int(vals[0]), float(vals[1]) / self.world
                parts = {k: float(v) / self.world for k, v in zip(parts, vals[2:])}
            else:
                n_tok, loss_v = int(mask.sum()), loss.item()
                parts = {k: v.item() for k, v in parts.items()}
            self.tokens += n_tok
            self.elapsed = base_elapsed + time.perf_counter() - t_run
            rkl, drift = self._router_metrics(t_router, sout.student_router or None, am)
            run_tokens = self.tokens - base_tokens
            tps = run_tokens / max(self.elapsed - base_elapsed, 1e-9)
            per_step = (self.elapsed - base_elapsed) / max(self.step - base_step, 1)
            e = DistillEvent("step", self.step, self.tokens, loss_v, parts, rkl, drift, lr, tps, self.elapsed,
                             eta=per_step * (target - self.step), best_ppl=self.best_ppl, stage=stage)
            if self.step % c.eval_every == 0 or self.step == target:
                ev = self.evaluate()
                e.kind, e.ppl, e.ppl_domains = "eval", ev["ppl"], ev["domains"]
                if self.best_ppl is None or ev["ppl"] < self.best_ppl:
                    self.best_ppl, self.best_step = ev["ppl"], self.step
                    self.best_state = self._snapshot()
                e.best_ppl = self.best_ppl
                self.elapsed = base_elapsed + time.perf_counter() - t_run
            self.history.append(e)
            yield e
        msg = (f"{self.step} steps, {self.tokens:,} tokens; best perplexity {fmt_ppl(self.best_ppl)} at step "
               f"{self.best_step}")
        warn = self.divergence()
        e = DistillEvent("done", self.step, self.tokens, elapsed=self.elapsed, best_ppl=self.best_ppl, stage=stage,
                         message=msg + (f". {warn}" if warn else ""))
        self.history.append(e)
        yield e


# ---- progressive compression ------------------------------------------------------------------------------


def drop_schedule(keep_fractions: list[float], criterion: str = "reap", calib: TokenBlocks | None = None):
    """Stage planners that bring every layer to keep_fractions[i] of the ORIGINAL expert count."""
    from .planners import drop_experts

    def make(frac):
        def planner(student, view, stats, original_counts):
            f = [max(0.0, 1 - round(o * frac) / e) for o, e in zip(original_counts, view.num_experts)]
            return drop_experts(stats, 0.0, criterion, layer_fractions=dict(enumerate(f)), view=view)
        planner.keep = frac
        return planner

    return [make(f) for f in keep_fractions]


def progressive(teacher, teacher_view: MoEModel, stages: list, steps_per_stage: list[int], calib: TokenBlocks,
                eval_blocks: TokenBlocks, config: DistillConfig | None = None) -> Iterator[DistillEvent]:
    """Prune a step, distill, prune the next step... all stages streamed as one sequence of events.

    Every stage distills toward the original teacher; statistics are re-collected on the current student before
    each stage's plan is written. Yields the events of each stage (``stage`` field) and, last, one "done" event for
    the whole schedule. The final (student, view, plan on the original model's experts) is
    ``progressive.last_student`` once the generator has ended.
    """
    from .stats import collect_stats

    config = (config or DistillConfig()).validate()
    student, sview = teacher, teacher_view
    original = list(teacher_view.num_experts)
    cumulative: Plan | None = None
    total_steps = 0
    for s, (planner, n) in enumerate(zip(stages, steps_per_stage)):
        stats = collect_stats(student, sview, calib, batch_size=config.batch_size)
        plan = planner(student, sview, stats, original)
        new, nview, _ = apply_plan(student, sview, plan, stats=stats)
        # the teacher is always the original model: express this stage's student against it
        cumulative = plan if cumulative is None else _compose(cumulative, plan, original)
        d = Distiller(teacher, teacher_view, new, nview, cumulative, calib, eval_blocks,
                      _with_steps(config, n))
        for e in d.run(stage=s):
            e.step += total_steps
            if e.kind != "done":
                yield e
        d.restore_best()
        total_steps += d.step
        student, sview = d.student, d.sview
    progressive.last_student = (student, sview, cumulative)
    yield DistillEvent("done", total_steps, message="progressive schedule finished")


def _with_steps(config: DistillConfig, n: int) -> DistillConfig:
    c = copy.copy(config)
    c.steps = n
    return c


def _compose(first: Plan, second: Plan, original: list[int]) -> Plan:
    """Expert drops of ``second`` (indices of the already-reduced model) expressed on the original model."""
    drops = {}
    for i, E in enumerate(original):
        kept = first.kept(i, E)
        more = second.drop_experts.get(i, [])
        drops[i] = sorted(set(first.drop_experts.get(i, [])) | {kept[j] for j in more})
    return Plan(drop_experts={i: v for i, v in drops.items() if v}, model=first.model,
                notes=f"{first.notes}; then {second.notes}")

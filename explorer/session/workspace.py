"""What a session works on: the model, its evaluation and calibration text, router statistics and the scores and
routing views derived from them; one lock for the session's long jobs."""
from __future__ import annotations

import hashlib
from pathlib import Path
import threading

import numpy as np

from ..data import Dataset, load_data
from ..loading import DEMO_MODEL, load_model
from ..devices import input_device
from ..errors import PlanError
from ..perplexity import perplexity
from ..saliency import CHEAP, RankStability, expert_scores, expert_similarity, rank_stability
from ..stats import RouterStats, VocabRouting, collect_stats, token_routes, vocab_routing
from .common import SessionError


class Workspace:
    def _init_workspace(self, block_len: int, max_tokens: int) -> None:
        self.model = self.tok = self.view = None
        self.source: str | None = None
        self.load_note = ""  # what loading another model cleared, in words
        self.data: Dataset | None = None
        self.data_source = "demo"
        self.data_uploaded = False  # data_source is the session's own copy of uploaded text, not a path typed
        self.block_len, self.max_tokens = block_len, max_tokens
        self.data_key: str | None = None  # which evaluation tokens the perplexities were measured on
        self.stats: RouterStats | None = None
        self._scores: dict[str, list[np.ndarray] | RankStability] = {}  # scores, and their stability
        self._vocab: tuple[str, VocabRouting] | None = None
        self.base = None  # Perplexity of the unmodified model on the evaluation blocks
        self.lock = threading.Lock()  # one long job per session

    def _forget_plans(self) -> None:
        """A new model: the session's other parts start again (``Session`` says which)."""

    def _forget_measurements(self) -> None:
        """New statistics: cached previews are measured again (``Session`` says which)."""

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def require(self, stats: bool = False) -> None:
        if self.model is None:
            raise SessionError("load a model first (Model tab)")
        if stats and self.stats is None:
            raise SessionError("collect statistics first (Model tab)")

    def load(self, source: str | None = None, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, device_map: str | None = None, max_memory: str | None = None) -> dict:
        """device_map ('auto') spreads a model larger than one device over GPUs, CPU and disk."""
        src = None if source in (None, "", "demo", str(DEMO_MODEL)) else source.strip()
        self.check_source(src, "model")
        had, old = (len(self.tried), self.source) if self.model is not None else (0, None)
        model, tok, view = load_model(src, device=device or None, dtype=dtype or None,
                                      trust_remote_code=trust_remote_code, device_map=device_map or None,
                                      max_memory=max_memory or None)
        self.model, self.tok, self.view = model, tok, view
        self.source = src or str(DEMO_MODEL)
        self.stats, self._scores, self.base, self._vocab = None, {}, None, None
        self._forget_plans()  # a new model: the plans, previews and students of the old one mean nothing
        self.load_note = (f"The {had} plan(s) tried on the previous model ({Path(old).name}) were cleared from "
                          "Compare: a plan's numbers belong to the model it was measured on." if had else "")
        self.set_data(self.data_source, uploaded=self.data_uploaded)
        return self.summary()

    def set_data(self, source: str = "demo", block_len: int | None = None, max_tokens: int | None = None,
                 uploaded: bool = False) -> dict:
        """``uploaded``: ``source`` is the session's own copy of uploaded files, not a path a user typed."""
        self.require()
        if not uploaded:
            self.check_source(source, "data")
        data = load_data(self.tok, source, block_len=block_len or self.block_len,
                         max_tokens=max_tokens if max_tokens is not None else self.max_tokens, model=self.model)
        self.data, self.data_source, self.data_uploaded = data, source, uploaded
        self.data_key = hashlib.sha1(data.eval.input_ids.numpy().tobytes()).hexdigest()[:12]
        self.stats, self._scores, self.base = None, {}, None
        return {"source": source, "domains": data.eval.domains, "calib_tokens": data.calib.tokens,
                "eval_tokens": data.eval.tokens, "block_len": data.eval.block_len}

    def summary(self) -> dict:
        self.require()
        s = self.view.summary()
        s["source"] = self.source
        s["device"] = str(input_device(self.model))
        s["dtype"] = str(next(self.model.parameters()).dtype).replace("torch.", "")
        s["dequantised"] = getattr(self.model, "explorer_dequantised", None)  # a compressed-tensors input
        return s

    def collect(self, progress=None) -> RouterStats:
        self.require()
        with self.lock:
            self.stats = collect_stats(self.model, self.view, self.data.calib, progress=progress)
            self._scores = {}
            self._forget_measurements()
            self.base = perplexity(self.model, self.data.eval)
        return self.stats

    def scores(self, criterion: str, progress=None) -> list[np.ndarray]:
        self.require(stats=True)
        if criterion not in self._scores:
            kw = self._model_running(criterion)
            if kw:
                kw["progress"] = progress
            self._scores[criterion] = expert_scores(self.stats, criterion, **kw)
        return self._scores[criterion]

    def _model_running(self, criterion: str) -> dict:
        """What a criterion that runs the model is given (the calibration text, 1,024 tokens); {} for the others."""
        if criterion in CHEAP:
            return {}
        return dict(model=self.model, view=self.view, blocks=self.data.calib, max_tokens=1024)

    def stats_for(self, plan, progress=None) -> RouterStats | None:
        """The statistics ``plan`` is previewed, applied or distilled with: for a GPTQ or SparseGPT plan, with each
        expert's input Hessians, collected on the calibration text the first time one asks (one more pass)."""
        from ..hessians import add_hessians, has_hessians

        if self.stats is not None and plan.needs_hessians() and not has_hessians(self.stats):
            add_hessians(self.stats, self.model, self.view, self.data.calib, progress=progress)
        return self.stats

    def stability(self, criterion: str, fraction: float = 0.25) -> RankStability:
        """How far ``criterion``'s ranking holds across the two halves of the calibration text (cached with the
        scores: the statistics' criteria read the one pass; reconstruction and ablation run on each half)."""
        self.require(stats=True)
        key = f"{criterion}@halves/{fraction}"
        if key not in self._scores:
            self._scores[key] = rank_stability(self.stats, criterion, fraction, **self._model_running(criterion))
        return self._scores[key]

    def stabilities(self, criteria, model_running: bool = False) -> dict[str, RankStability]:
        """The rank stability of each criterion that has one: the statistics' criteria always, reconstruction and
        ablation only when asked (they run the model on each half)."""
        return {c: self.stability(c) for c in criteria
                if c != "random" and (c in CHEAP or model_running)}

    def stability_text(self, criteria, stab: dict[str, RankStability], html: bool = False) -> str:
        """One line per criterion: how far its ranking holds across the calibration halves, or why it was not
        measured (Markdown, or HTML for the widgets)."""
        lines = []
        for c in criteria:
            if c in stab:
                lines.append(f"- {stab[c].sentence()}")
            elif c == "random":
                lines.append("- random: drawn, not measured; no ranking to test")
            else:
                lines.append(f"- {c}: not tested across halves (tick the box: it runs the model on each half)")
        head = "How sure the ranking is. The calibration text split in two (every other block), each half scored on its own:"
        if html:
            import html as h

            return f"<p><b>{h.escape(head)}</b></p><ul>" + "".join(f"<li>{h.escape(x[2:])}</li>" for x in lines) + "</ul>"
        return "\n".join([f"**{head}**", *lines])

    def similarity(self, layer: int, kind: str) -> np.ndarray:
        self.require(stats=True)
        return expert_similarity(self.stats, layer, kind, self.view)

    def vocab(self) -> VocabRouting:
        """Which experts each token id goes to, on (up to 8K tokens of) the calibration text; computed once."""
        self.require(stats=True)
        if self._vocab is None or self._vocab[0] != self.data_key:
            self._vocab = (self.data_key, vocab_routing(self.model, self.view, self.data.calib, max_tokens=8192))
        return self._vocab[1]

    def why_expert(self, layer: int, expert: int) -> dict:
        """Why this expert matters, in one panel (``explorer.why.explain_expert``)."""
        from ..why import explain_expert

        self.require(stats=True)
        try:
            return explain_expert(self.stats, int(layer), int(expert), self.view, self.vocab(), self.tok)
        except PlanError as err:
            raise SessionError(str(err)) from err

    def why_layer(self, layer: int) -> dict:
        """What the layer does and what dropping its MoE sub-layer costs (``explorer.why.explain_layer``)."""
        from ..why import explain_layer

        self.require(stats=True)
        try:
            return explain_layer(self.model, self.view, self.stats, int(layer), self.data.eval, self.baseline())
        except PlanError as err:
            raise SessionError(str(err)) from err

    def routes(self, text: str) -> dict:
        self.require()
        if not text or not text.strip():
            raise SessionError("type some text to see how it is routed")
        return token_routes(self.model, self.view, self.tok, text, max_tokens=400)

    def baseline(self):
        self.require()
        if self.base is None:
            self.base = perplexity(self.model, self.data.eval)
        return self.base

    def untrained_note(self) -> str:
        """Words for a model that predicts the evaluation text about as badly as a uniform guess over its
        vocabulary (perplexity above a quarter of the vocabulary size): a random or untrained checkpoint, whose
        router statistics describe no learned routing. Empty for a trained model, or before perplexity is known."""
        if self.base is None or self.model is None:
            return ""
        vocab = int(getattr(self.model.config.get_text_config(), "vocab_size", 0) or 0)
        if not vocab or not self.base.ppl > vocab / 4:
            return ""
        return (f"This model's perplexity ({self.base.ppl:,.0f}) is that of a guess over its {vocab:,}-token vocabulary "
                f"(a uniform guess scores {vocab:,}): it predicts this text no better than an untrained model, so its "
                "router statistics, saliency and cuts describe untrained routing, not what a trained model learned")
    @property
    def busy(self) -> bool:
        """A long job (distillation, statistics) holds this session."""
        return self.lock.locked()

    def require_idle(self) -> None:
        if self.busy:
            raise SessionError("a distillation or another long job is running in this session: stop it (Distill "
                               "tab) or wait for it to finish, then change the plan")

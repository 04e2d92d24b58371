"""Multi-token-prediction (MTP) heads: trained beside a model, and a cut student's head distilled from its teacher's.

DeepSeek-V3 (and R1, Kimi-K2, GLM-4.5, ...) carry MTP modules: at position i, module 1 mixes the model's last
hidden state h_i with the embedding of token t_{i+1} (``eh_proj`` over both, normed), runs one decoder layer and the
shared head, and predicts t_{i+2}; serving engines use it to draft tokens (speculative decoding). A cut changes the
hidden states the head reads, so its drafts degrade even where the main model recovers; SlimQwen distils the
student's MTP head from the teacher's as well. transformers builds the head (``MtpModel``) from the main model's own
layer classes and loads its weights from the checkpoint; this module trains and distils it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ExplorerError


class MTPError(ExplorerError):
    """A model without MTP layers, or an MTP head that does not belong to the model."""


def mtp_layers(model) -> int:
    """How many MTP modules the model's config declares (0: none)."""
    cfg = model.config.get_text_config()
    return int(getattr(cfg, "num_mtp_layers", 0) or getattr(cfg, "num_nextn_predict_layers", 0) or 0)


def new_head(model, seed: int = 0):
    """A freshly initialised MTP head for ``model`` (refused in words where its config declares none)."""
    from transformers.modeling_layers import MtpModel

    n = mtp_layers(model)
    if n == 0:
        raise MTPError(f"{model.config.model_type}: the config declares no multi-token-prediction layer "
                       "(num_mtp_layers / num_nextn_predict_layers is 0 or absent), so there is no MTP head to train "
                       "or distil; distil the main model alone")
    torch.manual_seed(seed)
    head = MtpModel(model, n).to(next(model.parameters()).dtype)
    with torch.no_grad():  # the model's own initialisation, on the head's layers only (embedding and head are shared)
        head.layers.apply(model._init_weights)
    bad = [name for name, p in head.layers.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MTPError(f"the new MTP head's {bad[0]} was left uninitialised by {type(model).__name__}'s "
                       "initialisation; load the head from a checkpoint instead (mtp.load_head)")
    return head


def load_head(model):
    """The MTP head stored in the model's checkpoint (DeepSeek-V3's ``model.layers.61``), read by transformers."""
    from transformers.modeling_layers import MtpModel

    if mtp_layers(model) == 0:
        new_head(model)  # raises in words
    return MtpModel.from_pretrained(model)


def head_logits(head, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The first MTP module's logits [B, L-1, V]: at i, from h_i and token t_{i+1}, a prediction of t_{i+2}."""
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device)[None].expand(B, -1)
    h = head.forward_layer(0, hidden[:, :-1], pos[:, 1:], None, input_ids=input_ids[:, 1:])
    return head._project_to_logits(h)


def tie(head, model):
    """Point ``head``'s shared embedding and output head at ``model``'s (after a copy or a cut)."""
    head.tie_with_main_model(model)
    return head


def _step(opt, loss: torch.Tensor, what: str) -> float:
    """One optimiser step on ``loss``; refused in words once it is not finite (nothing is stepped then)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise MTPError(f"{what} diverged (the loss is not finite); lower the learning rate")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return value


def _hidden_and_logits(model, ids):
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1], out.logits


def train_with_head(model, head, blocks, steps: int, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
                    mtp_weight: float = 0.3) -> list[float]:
    """Train ``model`` and its MTP ``head`` together on ``blocks`` (next-token loss + ``mtp_weight`` × the MTP
    head's loss on t_{i+2}, DeepSeek-V3's objective); returns the losses. For teaching models, not for real ones."""
    params = list({id(p): p for p in list(model.parameters()) + list(head.parameters())}.values())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train(), head.train()
    losses = []
    for _ in range(steps):
        ids = blocks.subset(torch.randint(0, len(blocks), (batch_size,), generator=g)).input_ids
        hidden, logits = _hidden_and_logits(model, ids)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        mtp = F.cross_entropy(head_logits(head, hidden, ids)[:, :-1].flatten(0, 1).float(), ids[:, 2:].flatten())
        losses.append(_step(opt, lm + mtp_weight * mtp, "training with the MTP head"))
    model.eval(), head.eval()
    return losses


@dataclass
class HeadQuality:
    """How well an MTP head drafts on held-out text: the share of positions whose top-1 draft of t_{i+2} is right
    (what a speculative decoder accepts, one draft deep) and the perplexity of its t_{i+2} prediction."""

    accuracy: float
    ppl: float
    positions: int
    accuracy_se: float  # binomial standard error over positions

    def __str__(self) -> str:
        return f"draft accuracy {self.accuracy:.1%} ± {self.accuracy_se:.1%}, MTP perplexity {self.ppl:.3f}"


@torch.no_grad()
def head_quality(model, head, blocks, batch_size: int = 8) -> HeadQuality:
    right = total = 0
    nll = 0.0
    for b in blocks.batches(batch_size):
        ids = b.input_ids
        hidden, _ = _hidden_and_logits(model, ids)
        lg = head_logits(head, hidden, ids)[:, :-1].float()
        tgt = ids[:, 2:]
        valid = (torch.arange(ids.shape[1] - 2)[None] < (b.lengths[:, None] - 2))
        right += int(((lg.argmax(-1) == tgt) & valid).sum())
        nll += float((F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), reduction="none") * valid.flatten()).sum())
        total += int(valid.sum())
    acc = right / max(total, 1)
    return HeadQuality(acc, math.exp(nll / max(total, 1)), total, math.sqrt(acc * (1 - acc) / max(total, 1)))


def distil(teacher, teacher_head, student, student_head, blocks, steps: int, lr: float = 1e-3,
           batch_size: int = 8, seed: int = 0, temperature: float = 1.0, mtp_weight: float = 1.0) -> list[float]:
    """Distil ``student`` from ``teacher`` (forward KL on the next-token logits) and, with ``mtp_weight`` > 0, the
    student's MTP head from the teacher's (forward KL on the t_{i+2} logits, each head reading its own model's hidden
    states), as SlimQwen does; ``mtp_weight`` = 0 trains the main model alone and leaves the head as it is."""
    if student_head is None and mtp_weight > 0:
        raise MTPError("distilling the MTP head needs the student's head (mtp.new_head or a copy of the teacher's)")
    trainable = list(student.parameters()) + (list(student_head.parameters()) if mtp_weight > 0 else [])
    trainable = list({id(p): p for p in trainable if p.is_floating_point()}.values())
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    teacher.eval(), teacher_head.eval()
    student.train()
    if student_head is not None:
        student_head.train(mtp_weight > 0)
    T = temperature

    def kl(t_logits, s_logits):
        return F.kl_div(F.log_softmax(s_logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1),
                        log_target=True, reduction="batchmean") * T * T

    losses = []
    for _ in range(steps):
        ids = blocks.subset(torch.randint(0, len(blocks), (batch_size,), generator=g)).input_ids
        with torch.no_grad():
            t_hidden, t_logits = _hidden_and_logits(teacher, ids)
            t_mtp = head_logits(teacher_head, t_hidden, ids) if mtp_weight > 0 else None
        s_hidden, s_logits = _hidden_and_logits(student, ids)
        loss = kl(t_logits.flatten(0, 1), s_logits.flatten(0, 1))
        if mtp_weight > 0:
            loss = loss + mtp_weight * kl(t_mtp.flatten(0, 1), head_logits(student_head, s_hidden, ids).flatten(0, 1))
        losses.append(_step(opt, loss, "distillation"))
    student.eval()
    if student_head is not None:
        student_head.eval()
    return losses


def student_head(teacher_head, student):
    """The teacher's MTP head copied for a cut student, reading the student's embedding and output head."""
    head = copy.deepcopy(teacher_head)
    return tie(head, student)

"""Multi-token-prediction heads (issue 27, SlimQwen's MTP distillation): refused in words on a model without one;
trained beside a tiny DeepSeek-V3; a cut student's head distilled from the teacher's moves towards it, and left
alone when only the main model is distilled."""
import copy

import pytest
import torch
import torch.nn.functional as F

from explorer import mtp
from explorer.apply import apply_plan
from explorer.moe import MoEModel
from explorer.plan import Plan
from explorer.tiny import random_blocks, tiny_model


def test_a_model_without_mtp_layers_is_refused_in_words():
    with pytest.raises(mtp.MTPError, match="declares no multi-token-prediction layer"):
        mtp.new_head(tiny_model("mixtral", seed=0))
    with pytest.raises(mtp.MTPError, match="declares no multi-token-prediction layer"):
        mtp.new_head(tiny_model("deepseek_v3", seed=0, num_nextn_predict_layers=0))


def _head_kl(teacher, t_head, student, s_head, blocks) -> float:
    ids = blocks.input_ids
    with torch.no_grad():
        t = mtp.head_logits(t_head, teacher(ids, output_hidden_states=True).hidden_states[-1], ids)
        s = mtp.head_logits(s_head, student(ids, output_hidden_states=True).hidden_states[-1], ids)
    return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))


def test_the_student_head_is_distilled_from_the_teachers():
    torch.manual_seed(0)
    model = tiny_model("deepseek_v3", seed=0, num_nextn_predict_layers=1)
    head = mtp.new_head(model)
    assert all(torch.isfinite(p).all() for p in head.parameters())  # transformers leaves its experts empty
    calib = random_blocks(16, 24, 0, vocab=64)
    losses = mtp.train_with_head(model, head, calib, steps=30, lr=3e-3)
    assert losses[-1] < losses[0]  # the head learns t+2 beside the model
    ev = random_blocks(4, 24, 9, vocab=64)
    q = mtp.head_quality(model, head, ev)
    assert 0 <= q.accuracy <= 1 and q.positions == 4 * 22 and q.ppl > 1
    view = MoEModel(model)
    plan = Plan(drop_experts={lay.index: [1, 2] for lay in view})  # two of every group of four
    plain, _, _ = apply_plan(model, view, plan)
    plain_head = mtp.student_head(head, plain)
    assert plain_head.embed_tokens is plain.get_input_embeddings() and plain_head.shared_head is plain.lm_head
    before = copy.deepcopy(plain_head.state_dict())
    mtp.distil(model, head, plain, plain_head, calib, steps=10, mtp_weight=0.0)
    after = plain_head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "layers." in k)  # the head was left as it was
    both, _, _ = apply_plan(model, view, plan)
    both_head = mtp.student_head(head, both)
    mtp.distil(model, head, both, both_head, calib, steps=10, mtp_weight=1.0)
    # on the text it was distilled on (random tokens have nothing to generalise; bench/mtp_distill.py measures real
    # held-out text), the distilled head drafts closer to the teacher's than the head left as it was
    left, distilled = _head_kl(model, head, plain, plain_head, calib), _head_kl(model, head, both, both_head, calib)
    assert distilled < 0.8 * left, (distilled, left)

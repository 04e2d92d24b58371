"""GPTQ and SparseGPT for experts (issue 27): each against an independent implementation of the published algorithm
(the column walk with an explicit inverse-Hessian downdate, no Cholesky factor, no blocks), each better than the
method it refines on the calibration inputs, the per-expert Hessians against brute force, and a GPTQ plan's
preview equal to its apply and to a plain transformers reload of its packed export."""
import json

import numpy as np
import pytest
import torch

from explorer.apply import apply_plan, export
from explorer.compensate import gptq, pruned_per_row, sparsegpt
from explorer.hessians import add_hessians
from explorer.moe import MoEModel
from explorer.ops.quantise import quantise_tensor
from explorer.plan import Plan, PlanError
from explorer.preview import previewing
from explorer.stats import RouterStats, collect_stats
from explorer.tiny import random_blocks, tiny_model


def _calibration(n=1024, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.4 + torch.randn(d, generator=g)
    W = torch.randn(24, d, generator=g)
    return X.double(), W.double()


def _obs_walk(W, H, damp, step):
    """The published column walk, written out: Hinv = (H + λI)⁻¹; for each column in order, ``step`` gives its new
    value q; the error (w − q) / Hinv_ii moves the columns not yet done by −err·Hinv_i,j; then row and column i leave
    the inverse (Hinv ← Hinv − Hinv_:,i Hinv_i,: / Hinv_ii)."""
    W = W.clone()
    H = H.clone() + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = step(W, Hinv, i)
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


def _gptq_reference(W, H, bits, gs, damp=0.01):
    half, lo, hi = (2 ** bits - 1) / 2, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = {}

    def step(Wc, Hinv, i):
        if i % gs == 0:  # the group's scale from its columns as they stand when the walk reaches it
            amax = Wc[:, i:i + gs].abs().amax(1)
            scale[i // gs] = torch.where(amax > 0, amax / half, torch.ones_like(amax)).float().to(torch.bfloat16).double()
        s = scale[i // gs]
        return torch.clamp(torch.round(Wc[:, i] / s), lo, hi) * s
    return _obs_walk(W, H, damp, step)


def _sparsegpt_reference(W, H, sparsity, nm=None, block=128, damp=0.01):
    """OBS saliency w_j² / [H⁻¹]_jj with [H⁻¹]_jj as it stands when the walk reaches column j: the first diagonal
    entry of the inverse of H restricted to columns j onwards (what removing the earlier columns leaves)."""
    chosen = {}
    Hd = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    at_j = torch.stack([torch.linalg.inv(Hd[j:, j:])[0, 0] for j in range(H.shape[0])])

    def step(Wc, Hinv, i):
        b0 = i - i % block
        if nm is None and i == b0:  # per row, the weights of this block with the least saliency
            width = min(block, Wc.shape[1] - b0)
            k = int(round(width * sparsity))
            score = Wc[:, b0:b0 + width] ** 2 / at_j[None, b0:b0 + width]
            chosen["mask"] = torch.zeros_like(score, dtype=torch.bool)
            if k:
                chosen["mask"].scatter_(1, torch.topk(score, k, 1, largest=False).indices, True)
        if nm is not None and (i - b0) % nm[1] == 0:
            n, m = nm
            score = Wc[:, i:i + m] ** 2 / at_j[None, i:i + m]
            chosen["nm"] = torch.zeros_like(score, dtype=torch.bool).scatter_(
                1, torch.topk(score, m - n, 1, largest=False).indices, True)
        zero = chosen["mask"][:, i - b0] if nm is None else chosen["nm"][:, (i - b0) % nm[1]]
        return torch.where(zero, torch.zeros_like(Wc[:, i]), Wc[:, i])
    return _obs_walk(W, H, damp, step)


def _out_err(X, W, A):
    return float(((X @ (W - A).T) ** 2).sum())


@pytest.mark.parametrize("bits,gs", [(3, 16), (4, 16), (4, 48)])
def test_gptq_is_the_published_algorithm_and_beats_rounding_to_nearest(bits, gs):
    X, W = _calibration()
    H = X.T @ X
    ours, scales = gptq(W.float(), H.float(), bits, gs)
    ref = _gptq_reference(W, H, bits, gs)
    codes = torch.round(ours.double() / scales.double().repeat_interleave(gs, 1)[:, :W.shape[1]])
    assert float((ours.double() - ref).abs().gt(1e-4).float().mean()) < 0.01  # a rounding tie may flip: ≤ 1%
    assert _out_err(X, W, ours.double()) == pytest.approx(_out_err(X, W, ref), rel=0.02)
    assert codes.abs().max() <= 2 ** (bits - 1) and torch.equal(scales, scales.to(torch.bfloat16).float())
    rtn = quantise_tensor(W.float(), bits, gs)[0].double()
    assert _out_err(X, W, ours.double()) < 0.8 * _out_err(X, W, rtn)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_is_the_published_algorithm_and_beats_wanda(nm):
    from explorer.ops.prune import _prune_mask

    X, W = _calibration(d=160)  # two blocks of columns: 128 and 32
    H = X.T @ X
    ours = sparsegpt(W.float(), H.float(), 0.5, nm).double()
    ref = _sparsegpt_reference(W, H, 0.5, nm)
    assert torch.equal(ours == 0, ref == 0)  # the same weights zeroed
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    assert int((ours == 0).sum(1)[0]) == pruned_per_row(W.shape[1], 0.5, nm)
    if nm:
        assert ((ours.reshape(W.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    wanda = W * _prune_mask(W.abs().float() * X.pow(2).sum(0).sqrt().float()[None], 0.5, nm).double()
    assert _out_err(X, W, ours) < _out_err(X, W, wanda)


def _brute_hessians(model, view, blocks):
    """Per expert Σ x xᵀ and Σ h hᵀ over the real tokens the router sends it, from the block inputs and the
    layer's own expert tensors, one token at a time."""
    from conftest import moe_block_inputs

    caps = moe_block_inputs(model, view, blocks)
    valid = blocks.attention_mask().reshape(-1).bool()
    out = []
    with torch.no_grad():
        for lay in view:
            x = caps[lay.index][0].reshape(-1, lay.hidden_size)
            _, w, idx = lay.router(x)
            hi = np.zeros((lay.num_experts, lay.hidden_size, lay.hidden_size))
            hm = np.zeros((lay.num_experts, lay.intermediate_size, lay.intermediate_size))
            for t in range(x.shape[0]):
                if not valid[t]:
                    continue
                for e in idx[t].tolist():
                    gu, dn, gb, db = lay.expert_tensors(e)
                    xt = x[t:t + 1].double()
                    hid = lay.ffn_hidden(x[t:t + 1], gu, gb).double()
                    hi[e] += (xt.T @ xt).numpy()
                    hm[e] += (hid.T @ hid).numpy()
            out.append((hi, hm))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_each_experts_hessian_is_the_sum_over_its_routed_tokens(family, tmp_path):
    model = tiny_model(family, seed=2)
    view = MoEModel(model)
    blocks = random_blocks(3, 20, 0, vocab=64)
    blocks.lengths[-1] = 12
    blocks.input_ids[-1, 12:] = 0
    stats = add_hessians(collect_stats(model, view, blocks, batch_size=2), model, view, blocks, batch_size=2)
    for lay, (hi, hm) in zip(stats.layers, _brute_hessians(model, view, blocks)):
        np.testing.assert_allclose(lay["hess_in"], hi, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lay["hess_mid"], hm, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lay["hess_tokens"], lay["count"])
    stats.save(tmp_path / "s.npz")  # kept by the statistics file
    again = RouterStats.load_file(tmp_path / "s.npz")
    np.testing.assert_array_equal(again.layers[0]["hess_in"], stats.layers[0]["hess_in"])


def test_a_gptq_plan_previews_applies_and_reloads_the_same():
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral", seed=5)
    view = MoEModel(model)
    calib = random_blocks(8, 24, 1, vocab=64)
    stats = collect_stats(model, view, calib, batch_size=4)
    plan = Plan.loads('{"quantise": {"bits": 3, "group_size": 16, "method": "gptq"}}')
    assert plan.needs_hessians() and "GPTQ" in plan.describe()
    with pytest.raises(PlanError, match="needs each expert's input Hessian: pass statistics"):
        with previewing(model, view, plan, stats):
            pass
    add_hessians(stats, model, view, calib)
    ids = random_blocks(2, 24, 7, vocab=64).input_ids
    import tempfile

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        with previewing(model, view, plan, stats):
            prev = model(ids).logits
        new, _, _ = apply_plan(model, view, plan, stats=stats)
        torch.testing.assert_close(new(ids).logits, prev, rtol=1e-5, atol=1e-5)
        out = export(new, None, plan, f"{tmp}/q")
        assert "stored packed" in json.loads((out / "summary.json").read_text())["weight_format"]
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        torch.testing.assert_close(got, prev, rtol=1e-4, atol=1e-4)
        with previewing(model, view, Plan.loads('{"quantise": {"bits": 3, "group_size": 16}}'), stats):
            rtn = model(ids).logits
    assert not torch.allclose(rtn, prev, atol=1e-4)  # GPTQ rounds differently from round-to-nearest
    assert "GPTQModifier" in plan.recipes(view)["llmcompressor"]


def test_the_command_line_plans_previews_and_keeps_hessians(demo, tmp_path, capsys):
    """`plan --quantise 3 --quantise-method gptq` and `--prune 0.5 --method sparsegpt` (named in `plan --help`);
    their previews collect the Hessians the statistics file lacks and say so; `stats --hessians` keeps them."""
    from explorer.cli import main

    small = ["--max-tokens", "512", "--block-len", "128"]
    assert main(["stats", "demo", "--out", str(tmp_path / "s.npz"), *small]) == 0
    assert main(["plan", "demo", "--stats", str(tmp_path / "s.npz"), "--quantise", "3", "--group-size", "64",
                 "--quantise-method", "gptq", "--out", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["quantise"]["method"] == "gptq"
    assert main(["plan", "demo", "--stats", str(tmp_path / "s.npz"), "--prune", "0.5", "--method", "sparsegpt",
                 "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    for plan in ("g.json", "p.json"):
        assert main(["preview", "demo", str(tmp_path / plan), "--stats", str(tmp_path / "s.npz"), *small]) == 0
        out = capsys.readouterr()
        assert "each expert's input Hessian on" in out.err and "plan:   perplexity" in out.out
    assert main(["stats", "demo", "--out", str(tmp_path / "h.npz"), "--hessians", *small]) == 0
    assert "hess_in" in RouterStats.load_file(tmp_path / "h.npz").layers[0]
    capsys.readouterr()
    assert main(["preview", "demo", str(tmp_path / "g.json"), "--stats", str(tmp_path / "h.npz"), *small]) == 0
    assert "input Hessian on" not in capsys.readouterr().err  # kept in the file: no second pass


def test_out_of_core_refuses_gptq_in_words_and_writes_nothing(tmp_path):
    """The out-of-core writer rounds shard by shard with no activations: a GPTQ plan is refused there, never
    silently rounded to nearest."""
    from explorer.checkpoint import apply_checkpoint

    src = tmp_path / "m"
    tiny_model("mixtral", seed=1).save_pretrained(src)
    plan = Plan.loads('{"quantise": {"bits": 4, "group_size": 16, "method": "gptq"}}')
    with pytest.raises(PlanError, match="gptq .*in-memory apply"):
        apply_checkpoint(src, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""Exports that the engines users serve with load, said before they are written (issue 31).

A plan with different expert counts or widths per layer, or dropped MoE sub-layers, is written in transformers'
serialised key names with its per-layer shapes in config.json and ``modeling_explorer.py`` (plain transformers and
lm-eval load it with ``trust_remote_code``), or padded to one count and width (a stock model, exact where the router
has a selection bias). The engine line's transformers and lm-eval claims are checked by loading the exports; the
vLLM / llama.cpp claims by the config and tensor names written.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from explorer.apply import apply_plan, export
from explorer.assets import ASSETS, DEMO_MODEL
from explorer.engines import LLAMA_CPP_ARCHS, PAD_BIAS, VLLM_ARCHS, padding_params, verdicts
from explorer.loading import ModelLoadError, load_model
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer.tiny import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _keys(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            out |= set(h.keys())
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def _plans(view) -> dict[str, Plan]:
    first, last = view[0].index, view[len(view) - 1].index
    return {"counts differ": Plan(drop_experts={first: [1, 2]}),
            "counts differ + Layer Drop": Plan(drop_experts={first: [1, 2]}, drop_layers=[last])}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_a_per_layer_export_loads_in_plain_transformers_with_its_model_file(family, tmp_path):
    """Before: internal fused key names and explorer_layout.json; plain transformers failed with a size mismatch."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, seed=3)
    view = MoEModel(model)
    stock = tmp_path / "stock"
    model.save_pretrained(stock)  # the names save_pretrained writes for this family
    stock_names = {re.sub(r"\.\d+\.", ".N.", k) for k in _keys(stock)}
    for name, plan in _plans(view).items():
        new, _, layout = apply_plan(model, view, plan)
        assert layout is not None, name
        line = verdicts(plan, view)
        assert [v.loads for v in line] == [True, True, False, False], (name, line)
        assert "trust_remote_code=True" in line[0].how and "one expert count" in line[2].how
        out = export(new, None, plan, tmp_path / name.replace(" ", ""))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["ExplorerMoEForCausalLM"] and "explorer_per_layer" in cfg
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_explorer.ExplorerMoEForCausalLM"
        assert not (out / "explorer_layout.json").exists()
        written = {re.sub(r"\.\d+\.", ".N.", k) for k in _keys(out)}
        assert written <= stock_names, (name, sorted(written - stock_names)[:3])  # serialised names only
        want = _logits(new, _ids(model))
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert type(plain).__name__ == "ExplorerMoEForCausalLM"
        assert torch.equal(_logits(plain, _ids(model)), want), name
        ours, _, v2 = load_model(out, device="cpu", with_tokenizer=False)  # without running the folder's code
        assert torch.equal(_logits(ours, _ids(model)), want), name
        assert v2.num_experts == [len(plan.kept(lay.index, lay.num_experts)) for lay in view
                                  if lay.index not in plan.dropped_layers()]


def test_a_per_layer_export_scores_in_lm_eval_and_reexports_cleanly(tmp_path):
    """lm-eval's ``hf`` model with trust_remote_code=True gives the loglikelihoods of the explorer's model; an
    export of the reloaded model, cut back to one count per layer, is a stock model again (no stale fields)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    vocab = json.loads((DEMO_MODEL / "config.json").read_text())["vocab_size"]
    model = tiny_model("olmoe", seed=2, vocab_size=vocab)
    view = MoEModel(model)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    plan = Plan(drop_experts={0: [1, 2]})
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, tok, plan, tmp_path / "per-layer")
    lm = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=1, dtype="float32")
    ctx, cont = "In the beginning God created", " the heaven and the earth."
    got = lm.loglikelihood([type("R", (), {"args": (ctx, cont)})()])[0][0]
    ids = tok(ctx + cont, return_tensors="pt").input_ids
    n = len(tok(ctx).input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(new(ids).logits.float(), -1)[0, n - 1:-1].gather(-1, ids[0, n:, None]).sum()
    assert got == pytest.approx(lp.item(), abs=1e-4)
    back, _, bview = load_model(out, device="cpu", with_tokenizer=False)
    again = Plan(drop_experts={i: ([1, 2] if i else []) for i in range(len(bview))})
    new2, _, layout2 = apply_plan(back, bview, again)
    assert layout2 is None
    out2 = export(new2, tok, again, tmp_path / "uniform")
    cfg = json.loads((out2 / "config.json").read_text())
    assert "explorer_per_layer" not in cfg and "auto_map" not in cfg and cfg["architectures"] == ["OlmoeForCausalLM"]
    assert not (out2 / "modeling_explorer.py").exists()


def _grouped_deepseek():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("deepseek_v3", n_group=2, topk_group=1, num_experts_per_tok=2)
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    view = MoEModel(model)
    with torch.no_grad():  # a trained router's correction biases are not zero
        for lay in view:
            lay.correction_bias.copy_(torch.randn_like(lay.correction_bias) * 0.1)
    return model, view


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v3-grouped", "gpt_oss", "mixtral-widths"])
def test_the_padded_form_is_a_stock_model_with_the_plans_function(family, tmp_path):
    """Zero experts the router never selects (grouped routing keeps each group's experts in their group), zero
    neurons, zero blocks for dropped sub-layers: plain from_pretrained without remote code gives the padded model's
    logits exactly and the per-layer model's to float32 rounding, and routes no token to a padded expert; the config and tensor names are those of a stock checkpoint (what vLLM and llama.cpp
    build from), and the padding added is the number the engine line said."""
    from transformers import AutoModelForCausalLM

    stats = None
    if family == "deepseek_v3-grouped":
        model, view = _grouped_deepseek()
        lay = view[0]
        plan = Plan(drop_experts={lay.index: [0, 5]})  # one expert from each group of four
    else:
        model = tiny_model(family.split("-")[0], seed=5)
        view = MoEModel(model)
        if family == "mixtral-widths":
            from explorer.stats import collect_stats
            from explorer.tiny import random_blocks

            stats = collect_stats(model, view, random_blocks(4, 16, seed=1), batch_size=4)
            plan = Plan(slim=0.5, slim_layers=[0], drop_layers=[1])
        elif family == "gpt_oss":
            plan = Plan(drop_experts={0: [1, 2]}, drop_layers=[2])
        else:
            plan = Plan(drop_experts={view[0].index: [1, 2]})
    ref, _, layout = apply_plan(model, view, plan, stats=stats)
    assert layout is not None
    said = verdicts(plan, view, form="padded")
    assert all(v.loads for v in said), said
    padded, pview, playout = apply_plan(model, view, plan, stats=stats, form="padded")
    assert playout is None
    out = export(padded, None, plan, tmp_path / "padded")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"][0] in VLLM_ARCHS and cfg["architectures"][0] in LLAMA_CPP_ARCHS
    assert "explorer_per_layer" not in cfg and "auto_map" not in cfg
    stock = tmp_path / "stock"
    model.save_pretrained(stock)
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in _keys(out)} == {re.sub(r"\.\d+\.", ".N.", k) for k in _keys(stock)}
    plain = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    ids = _ids(model, seed=7)
    # the export is the padded model, bit for bit; the padded model is the per-layer model's function up to the
    # rounding of products whose shapes differ (wider routers and expert stacks, zero neurons: exact on an Intel
    # VM's kernels, 1-2e-6 apart on an AMD VM's MKL kernels)
    assert torch.equal(_logits(plain, ids), _logits(padded, ids)), family
    assert torch.allclose(_logits(plain, ids), _logits(ref, ids), atol=1e-5, rtol=0), family
    # and no token is ever routed to a padded (all-zero) expert of a block that is kept (a dropped block is all zero)
    seen = {}
    pv = MoEModel(plain)
    hooks = [lay.block.register_forward_pre_hook(lambda m, a, _i=i: seen.__setitem__(_i, a[0])) for i, lay in
             enumerate(pv)]
    _logits(plain, ids)
    for h in hooks:
        h.remove()
    padded_seen = 0
    for i, lay in enumerate(pv):
        zero = [e for e in range(lay.num_experts) if not lay.gate_up[e].any()]
        if len(zero) == lay.num_experts:
            continue
        with torch.no_grad():
            _, _, idx = lay.route(seen[i].reshape(-1, seen[i].shape[-1]))
        assert not set(idx.flatten().tolist()) & set(zero), (family, i, zero)
        padded_seen += len(zero)
    assert padded_seen == (0 if family == "mixtral-widths" else 2), (family, padded_seen)
    added = sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in ref.parameters())
    assert added > 0 and added == padding_params(plan, view), (added, padding_params(plan, view))
    assert f"{added:,} zero parameters" in said[0].how
    counts = {lay.num_experts for lay in MoEModel(plain)}
    assert len(counts) == 1  # one expert count, as vLLM and llama.cpp build every layer
    if family.startswith("deepseek"):
        bias = MoEModel(plain)[0].correction_bias
        assert (bias == PAD_BIAS).sum() == 2


def test_padding_is_refused_in_words_where_it_would_change_routing(tmp_path):
    model = tiny_model("olmoe", seed=1)
    view = MoEModel(model)
    plan = Plan(drop_experts={0: [1, 2]})
    line = verdicts(plan, view)
    assert "keep the same count per layer" in line[2].how and "no selection bias" in line[2].how
    with pytest.raises(PlanError, match="no selection bias"):
        apply_plan(model, view, plan, form="padded")
    uniform = Plan(drop_experts={i: [1, 2] for i in range(len(view))})
    assert all(v.loads for v in verdicts(uniform, view))


def test_cli_says_the_engines_before_it_writes_and_pads_on_request(tmp_path, capsys):
    from explorer.cli import main

    model = tiny_model("deepseek_v3", seed=2)
    src = tmp_path / "src"
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(src)
    view = MoEModel(model)
    plan = Plan(drop_experts={view[0].index: [1, 2]})
    plan.to_json(tmp_path / "plan.json")
    assert main(["apply", str(src), str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"), "--no-eval",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.index("engines that load this export") < out.index("written to")
    assert "no  vLLM / SGLang" in out and "--form padded" in out
    assert main(["apply", str(src), str(tmp_path / "plan.json"), "--out", str(tmp_path / "b"), "--no-eval",
                 "--device", "cpu", "--form", "padded"]) == 0
    out = capsys.readouterr().out
    assert "yes vLLM / SGLang" in out and "padded form" in out
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "auto_map" not in cfg
    tc = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tc


def test_exported_tokenizers_name_a_class_transformers_4_knows_and_encode_the_same(tmp_path):
    """transformers 5 writes "TokenizersBackend", unknown to transformers 4 (llama.cpp's converter pins it)."""
    from transformers import AutoTokenizer

    model = tiny_model("mixtral", seed=1, vocab_size=json.loads((DEMO_MODEL / "config.json").read_text())[
        "vocab_size"])
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    plan = Plan(drop_experts={0: [1]})
    new, _, layout = apply_plan(model, MoEModel(model), plan)
    out = export(new, tok, plan, tmp_path / "out")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"backend", "is_local", "local_files_only"} & set(cfg)
    back = AutoTokenizer.from_pretrained(out)
    text = "Thou art the king's son; def f(x): return x ** 2 — ünïcode"
    assert back(text).input_ids == tok(text).input_ids
    assert json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"  # the bundled asset too


def test_lm_eval_cli_runs_the_demo_tasks_from_any_folder(tmp_path):
    """Before: the YAMLs' data files were read relative to the working folder, so only `cd assets/tasks` worked."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={DEMO_MODEL},dtype=float32", "--tasks", "demo_next_word,demo_next_line_code",
                        "--include_path", str(ASSETS / "tasks"), "--limit", "8", "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^\|(demo_\w+)\s*\|.*?\|(?:acc|exact_match)\s*\|.\s*\|\s*([\d.]+)\|", r.stdout, re.M)}
    assert set(rows) == {"demo_next_word", "demo_next_line_code"}, r.stdout[-1500:]
    from explorer.tasks import evaluate_tasks

    model, tok, _ = load_model(device="cpu", dtype="float32")
    ours = evaluate_tasks(model, tok, "demo_next_word,demo_next_line_code", limit=8)["tasks"]
    assert {t: round(v["value"], 4) for t, v in ours.items()} == {t: round(v, 4) for t, v in rows.items()}


def test_the_data_loader_line_is_accepted_only_beside_the_bundled_loader(tmp_path):
    import shutil

    from explorer.tasks import resolve
    from explorer.taskfiles import TaskFileError

    folder = tmp_path / "tasks"
    shutil.copytree(ASSETS / "tasks", folder)
    assert len(resolve(str(folder))) >= 5  # a copy of the bundled folder reads as data
    (folder / "demo_data.py").write_text((folder / "demo_data.py").read_text() + "\nimport os\n")
    with pytest.raises(TaskFileError, match="custom_dataset names code"):
        resolve(str(folder))
    shutil.copy(ASSETS / "tasks" / "demo_data.py", folder / "demo_data.py")
    y = folder / "demo_next_word.yaml"
    y.write_text(y.read_text().replace("demo_data.load", "demo_data.evil"))
    with pytest.raises(TaskFileError, match="custom_dataset names code"):
        resolve(str(folder))
    y.write_text(y.read_text().replace("custom_dataset: !function demo_data.evil\n", "") +
                 "tag: [demo, !function demo_data.load]\n")
    with pytest.raises(TaskFileError, match="names code"):
        resolve(str(folder))


def test_a_damaged_per_layer_config_is_said_in_words(tmp_path):
    model = tiny_model("qwen3_moe", seed=2)
    view = MoEModel(model)
    plan = Plan(drop_experts={0: [1]}, drop_layers=[2])
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, None, plan, tmp_path / "exp")
    good = json.loads((out / "config.json").read_text())
    spec = good["explorer_per_layer"]
    some = next(iter(spec["shapes"]))
    damages = [
        ({"shapes": {"model.layers.9.mlp.experts.down_proj": [3, 4, 5]}}, "is not a weight of this model"),
        ({"shapes": {some: [-1] * len(spec["shapes"][some])}}, "positive whole numbers"),
        ({"settings": {"model.layers.0.mlp.nothing": {"num_experts": 3}}}, "not a module of this model"),
        ({"settings": {next(iter(spec["settings"])): {"num_experts": 0}}}, "positive whole number"),
        ({"dropped": {"model.layers.7.mlp": {}}}, "is not a module of this model"),
    ]
    for change, words in damages:
        cfg = json.loads(json.dumps(good))
        cfg["explorer_per_layer"] = {**spec, **change}
        (out / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelLoadError, match=words):
            load_model(out, device="cpu", with_tokenizer=False)


def _recipe_groups(path: Path) -> dict:
    """{group: (targets, weights)} of an llm-compressor recipe, read by llm-compressor's own loader where it is
    installed (its pins conflict with this environment's transformers, so CI may not have it), else checked
    against compressed-tensors' published QuantizationScheme, which llm-compressor validates groups with."""
    import yaml
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    try:
        from llmcompressor.recipe import Recipe
    except ImportError:
        Recipe = None
    if Recipe is not None:
        mod = Recipe.create_instance(str(path)).modifiers[0]
        assert type(mod).__name__ == "QuantizationModifier"
        return {k: (g.targets, g.weights.model_dump()) for k, g in mod.config_groups.items()}, list(mod.ignore)
    doc = yaml.safe_load(path.read_text())
    mods = doc["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["QuantizationModifier"]
    body = mods["QuantizationModifier"]
    assert set(body) <= {"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme"}
    out = {}
    for k, g in body["config_groups"].items():
        scheme = QuantizationScheme(targets=g["targets"], weights=QuantizationArgs(**g["weights"]))
        out[k] = (scheme.targets, scheme.weights.model_dump())
    return out, body["ignore"]


def _matches(targets, name: str) -> bool:
    return any(re.match(t[3:], name) if t.startswith("re:") else t == name for t in targets)


def test_a_quantise_plan_writes_an_llm_compressor_recipe_with_its_scheme(tmp_path, capsys):
    """The plan's widths, group size and the modules left in full precision, for llm-compressor's oneshot on the
    cut model: each group's targets match exactly the experts the explorer stored at that width."""
    from explorer.cli import main

    model = tiny_model("qwen2_moe", seed=1)
    view = MoEModel(model)
    plan = Plan(drop_experts={0: [1]},
                quantise={"bits": 4, "group_size": 32, "per_expert": {0: {2: 8, 3: 2}}, "shared": 8})
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, None, plan, tmp_path / "q", layout=layout, view=view)
    groups, ignore = _recipe_groups(out / "llmcompressor_recipe.yaml")
    assert "lm_head" in ignore
    width = {k: w["num_bits"] for k, (_, w) in groups.items()}
    assert width == {"experts_2bit": 2, "experts_4bit": 4, "experts_8bit": 8, "shared_experts": 8}
    assert all(w["group_size"] == 32 and w["symmetric"] and w["strategy"] == "group" for _, w in groups.values())
    names = sorted({re.sub(r"\.weight$", "", k) for k in _keys(out) if k.endswith(".weight")})
    for slot, bits in [(1, 8), (2, 2), (0, 4), (3, 4)]:  # original experts 2 and 3 are slots 1 and 2 after the drop
        mod = f"model.layers.0.mlp.experts.{slot}.gate_proj"
        hits = [k for k, (t, _) in groups.items() if _matches(t, mod)]
        assert hits == [{8: "experts_8bit", 2: "experts_2bit", 4: "experts_4bit"}[bits]], (slot, hits)
    shared = [n for n in names if "shared_expert." in n]
    assert shared and all(_matches(groups["shared_experts"][0], n) for n in shared)
    assert not any(_matches(t, n) for t, _ in groups.values() for n in names if n.endswith(("mlp.gate", "lm_head")))
    # the plan command writes the recipe beside the plan
    src = tmp_path / "src"
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(src)
    assert main(["plan", str(src), "--quantise", "3", "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 0
    assert "llmcompressor recipe ->" in capsys.readouterr().out
    groups, _ = _recipe_groups(tmp_path / "p.llmcompressor.yaml")
    assert {k: w["num_bits"] for k, (_, w) in groups.items()} == {"routed_experts": 3}

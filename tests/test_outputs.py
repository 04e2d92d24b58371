"""Nothing lost: export and output-file rules, atomic exports, killed runs, and errors in words (CLI and API)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from explorer.apply import apply_plan, export
from explorer.cli import main
from explorer.loading import DEMO_MODEL, ModelLoadError, load_model
from explorer.moe import MoEModel
from explorer.outputs import OutputError, is_export
from explorer.plan import Plan
from explorer.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small():
    """A tiny OLMoE with the demo tokenizer, saved to a folder: a user's input model."""
    import json as _json

    vocab = _json.loads((DEMO_MODEL / "config.json").read_text())["vocab_size"]
    model = tiny_model("olmoe", seed=2, vocab_size=vocab)  # speaks the demo tokenizer's ids
    return model, MoEModel(model)


@pytest.fixture()
def saved(tmp_path, small):
    from transformers import AutoTokenizer

    src = tmp_path / "models" / "olmoe"
    small[0].save_pretrained(src)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(src)
    return src


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(small, out, **kw):
    model, view = small
    plan = Plan(drop_experts={0: [1]})
    new, _, layout = apply_plan(model, view, plan)
    return export(new, None, plan, out, layout=layout, summary={"x": 1}, **kw)


# ---- export folder rules ---------------------------------------------------------------------------------
def test_overwrite_never_replaces_what_export_did_not_write(small, tmp_path, saved):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    before = _files(saved)
    cases = [(other, "not written by an export"), (saved, "is the input model"),
             (saved.parent, "contains the input model"), (saved / "sub", "inside the input model")]
    for out, msg in cases:
        with pytest.raises(OutputError, match=msg):
            _export(small, out, source=saved, overwrite=True)
    assert (other / "holiday.jpg").read_bytes() == b"precious" and list(other.iterdir()) == [other / "holiday.jpg"]
    assert _files(saved) == before
    with pytest.raises(OutputError, match="not empty"):
        _export(small, other, source=saved)
    with pytest.raises(OutputError, match="no output path"):
        _export(small, "  ")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        _export(small, tmp_path / "afile")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        _export(small, tmp_path / "afile" / "out")


def test_overwrite_refuses_cwd_and_home(small, tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    for d in (work, home):
        d.mkdir()
        (d / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out in (work, home, tmp_path):
        with pytest.raises(OutputError, match="working directory|home folder"):
            _export(small, out, overwrite=True)
    assert (work / "notes.txt").read_text() == "mine" and (home / "notes.txt").read_text() == "mine"
    out = _export(small, "exports/a")  # a relative path under the working directory is fine
    assert out == work / "exports" / "a"


def test_export_replaces_a_previous_export_atomically(small, tmp_path):
    out = _export(small, tmp_path / "exp")
    assert is_export(out)
    first = _files(out)
    assert {"plan.json", "summary.json", "config.json", "model.safetensors"} <= set(first)
    mode = os.stat(out).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # a normal folder, not mkdtemp's 0700

    class Boom(Exception):
        pass

    model, view = small
    plan = Plan(drop_experts={0: [1, 2]})
    new, _, layout = apply_plan(model, view, plan)

    class BadTok:
        def save_pretrained(self, folder):
            raise Boom("disk full")

    with pytest.raises(Boom):
        export(new, BadTok(), plan, out, layout=layout, overwrite=True)
    assert _files(out) == first  # the previous export is untouched, all or nothing
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no partial folder left behind
    export(new, None, plan, out, layout=layout, overwrite=True)
    assert json.loads((out / "plan.json").read_text())["drop_experts"] == {"0": [1, 2]}


KILLED_EXPORT = """
import sys, time
from explorer.apply import apply_plan, export
from explorer.moe import MoEModel
from explorer.plan import Plan
from explorer.tiny import tiny_model
model = tiny_model("olmoe")
plan = Plan(drop_experts={0: [1]})
new, _, layout = apply_plan(model, MoEModel(model), plan)
def stall(self, path=None):
    print("writing", flush=True)
    time.sleep(120)
Plan.to_json = stall
export(new, None, plan, sys.argv[1], layout=layout)
"""


def test_a_killed_export_leaves_nothing_the_next_one_keeps(small, tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "writing"  # the model is on disk in the partial folder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.explorer-partial-")]
    assert len(left) == 1 and (left[0] / "config.json").exists() and not out.exists()
    _export(small, out)
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # the leftover of the killed run is gone


class _UserWritesThere:
    """A tokenizer whose save runs while the export is half written: meanwhile the user puts a file at --out."""

    def __init__(self, out: Path, replace_export: bool = False):
        self.out, self.replace_export = out, replace_export

    def save_pretrained(self, folder):
        if self.replace_export:  # the previous export is moved away and a folder of the user's takes its place
            self.out.rename(self.out.with_name("moved-away"))
        self.out.mkdir(exist_ok=True)
        (self.out / "thesis.tex").write_text("six months of work")


@pytest.mark.parametrize("previous", [False, True])
def test_a_folder_that_appears_during_the_export_is_never_replaced(small, tmp_path, previous):
    out = tmp_path / "exp"
    if previous:
        _export(small, out)
    model, view = small
    plan = Plan(drop_experts={0: [2]})
    new, _, layout = apply_plan(model, view, plan)
    with pytest.raises(OutputError, match="while the export was being written") as err:
        export(new, _UserWritesThere(out, replace_export=previous), plan, out, layout=layout, overwrite=previous)
    assert (out / "thesis.tex").read_text() == "six months of work"
    kept = Path(str(err.value).rsplit(" ", 1)[-1])
    assert kept.parent == tmp_path and is_export(kept)  # the finished export is kept beside it, not lost
    assert json.loads((kept / "plan.json").read_text())["drop_experts"] == {"0": [2]}
    assert not [p for p in tmp_path.iterdir() if ".explorer-partial-" in p.name]


KILLED_BETWEEN_RENAMES = """
import sys, time
from pathlib import Path
from explorer.apply import apply_plan, export
from explorer.moe import MoEModel
from explorer.plan import Plan
from explorer.tiny import tiny_model
model = tiny_model("olmoe")
plan = Plan(drop_experts={0: [3]})
new, _, layout = apply_plan(model, MoEModel(model), plan)
rename = Path.rename
def slow_rename(self, target):
    if ".explorer-partial-" in self.name:  # the previous export is already set aside
        print("between", flush=True)
        time.sleep(120)
    return rename(self, target)
Path.rename = slow_rename
export(new, None, plan, sys.argv[1], layout=layout, overwrite=True)
"""


def test_a_kill_between_the_renames_of_an_overwrite_loses_nothing(small, tmp_path):
    out = _export(small, tmp_path / "exp")
    first = _files(out)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "between"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()  # the only copy of the previous export is the set-aside folder
    assert any(".exp.explorer-old-" in p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError, match="exists and is not empty"):
        _export(small, out)  # the next export puts the previous one back first, then refuses to replace it
    assert _files(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def _explorer(*args, limit_bytes=None, **kw):
    """The CLI in its own process (a file-size limit stands in for a full disk: writes fail as they would)."""
    import resource

    def limits():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "explorer", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limits, **kw)


@pytest.mark.parametrize("out_of_core", [False, True])
def test_a_full_disk_is_said_in_words_and_leaves_nothing(saved, tmp_path, out_of_core):
    plan = tmp_path / "p.json"
    n = json.loads((saved / "config.json").read_text())["num_hidden_layers"]
    plan.write_text(json.dumps({"drop_experts": {str(i): [1] for i in range(n)}}))
    out = tmp_path / "out"
    proc = _explorer("apply", saved, plan, "--out", out, "--no-eval", *(["--out-of-core"] if out_of_core else []),
                     limit_bytes=64 << 10)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err
    assert "the disk is full" in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["models", "p.json"]


def test_ctrl_c_is_said_in_words_and_leaves_nothing(saved, tmp_path):
    out = tmp_path / "stats.json"
    proc = _explorer("stats", saved, "--out", out, "--batch-size", "1")
    line = ""
    while "statistics:" not in line:  # the model is loaded and the pass has started
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the stats run ended before it started its pass"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["models"]


# ---- the command line ------------------------------------------------------------------------------------
def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_apply_never_deletes_the_folder_holding_the_input(capsys, saved, tmp_path):
    (tmp_path / "plan.json").write_text('{"drop_experts": {"0": [1]}}')
    before = _files(saved.parent)
    code, _, err = cli(capsys, "apply", saved, tmp_path / "plan.json", "--out", saved.parent, "--overwrite",
                       "--no-eval")
    assert code == 2 and "contains the input model" in err
    assert _files(saved.parent) == before


def test_cli_stats_and_plan_outputs_are_checked_first(capsys, saved, tmp_path):
    before = _files(saved)
    for target in (saved / "config.json", saved / "model.safetensors", saved / "new-stats.json"):
        code, _, err = cli(capsys, "stats", saved, "--out", target, "--overwrite")
        assert code == 2 and "inside the input model folder" in err
    assert _files(saved) == before
    existing = tmp_path / "stats.json"
    existing.write_text("{}")
    code, _, err = cli(capsys, "stats", saved, "--out", existing)
    assert code == 2 and "exists" in err and "--overwrite" in err and existing.read_text() == "{}"
    code, _, err = cli(capsys, "plan", saved, "--stats", existing, "--drop-experts", "0.25", "--out", existing)
    assert code == 2 and "exists" in err


def test_cli_writes_stats_then_refuses_to_replace_them(capsys, saved, tmp_path):
    out = tmp_path / "s.npz"
    args = ("stats", saved, "--data", ROOT / "assets" / "corpus" / "code" / "eval.txt", "--max-tokens", "256",
            "--block-len", "64", "--out", out)
    assert cli(capsys, *args)[0] == 0 and out.exists()
    assert cli(capsys, *args)[0] == 2
    assert cli(capsys, *args, "--overwrite")[0] == 0


def test_cli_errors_in_words(capsys, saved, tmp_path):
    bad_json = tmp_path / "wrong.json"
    bad_json.write_text('{"layers": [{"count": [1, 2]}]}')
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x80\x04not a zip at all" * 10)
    (tmp_path / "plan.json").write_text('{"drop_experts": {"0": [1]}}')
    cases = [
        (("eval", saved, "--device", "cuda"), "CUDA is not available"),
        (("eval", saved, "--device", "tpu9"), "unknown device 'tpu9'"),
        (("preview", saved, tmp_path / "plan.json", "--stats", bad_json), "not a statistics file"),
        (("preview", saved, tmp_path / "plan.json", "--stats", garbage), "not a statistics file"),
        (("plan", saved, "--stats", garbage, "--drop-experts", "0.5", "--out", tmp_path / "p.json"),
         "not a statistics file"),
        (("eval", "no-such-model-name"), "cannot be reached"),
        (("preview", tmp_path / "not-a-model", tmp_path / "missing-plan.json"), "plan file not found"),
    ]
    for args, msg in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)
    (tmp_path / "broken.json").write_text('{"drop_experts": {"0": [1,}')
    code, _, err = cli(capsys, "apply", tmp_path / "not-a-model", tmp_path / "broken.json", "--out", tmp_path / "o")
    assert code == 2 and "line 1, column" in err  # the plan is read before the (missing) model
    for flag, value, msg in (("--batch-size", "0", "at least 1"), ("--max-tokens", "-5", "at least 1"),
                             ("--block-len", "1", "at least 2")):
        with pytest.raises(SystemExit):
            main(["eval", str(saved), flag, value])
        assert msg in capsys.readouterr().err


def test_damaged_models_are_reported_not_dumped(saved):
    cfg = saved / "config.json"
    text = cfg.read_text()
    cfg.write_text(text.replace('"model_type"', '"model_type",,', 1))
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON at line \d+ column \d+"):
        load_model(saved, device="cpu")
    cfg.write_text(text)
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        load_model(saved, device="cpu")


def _edit_weights(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    w = folder / "model.safetensors"
    t = load_file(w)
    fn(t)
    save_file(t, w, metadata={"format": "pt"})


def _first(t: dict, *parts: str) -> str:
    return next(k for k in sorted(t) if all(p in k for p in parts))


@pytest.mark.parametrize("damage,words", [
    (lambda t: t.pop(_first(t, "mlp.gate.weight")), r"missing from the checkpoint \(model\.layers\.0\.mlp\.gate"),
    (lambda t: t.pop(_first(t, "experts.", "down_proj")), r"experts\.down_proj: wrong shape"),
    (lambda t: t.__setitem__(_first(t, "experts.", "up_proj"), t[_first(t, "experts.", "up_proj")][:, :-1].clone()),
     r"experts\.gate_up_proj: (missing|wrong shape|cannot be converted)"),
    (lambda t: t.__setitem__(_first(t, "experts.", "up_proj"), t[_first(t, "experts.", "up_proj")].to(torch.int32)),
     r"stored as I32 \(integers\)"),
])
def test_a_tensor_missing_misshapen_or_integer_is_named(saved, damage, words, tmp_path):
    from transformers.utils import logging as hf_logging

    _edit_weights(saved, damage)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # as a quiet caller (or an earlier test) leaves it: the report is still read
    try:
        with pytest.raises(ModelLoadError, match=words):
            load_model(saved, device="cpu")
    finally:
        hf_logging.set_verbosity(verbosity)


def test_an_integer_expert_tensor_is_refused_out_of_core(saved, tmp_path):
    from explorer.checkpoint import apply_checkpoint
    from explorer.plan import PlanError

    _edit_weights(saved, lambda t: t.__setitem__(k := _first(t, "experts.", "up_proj"), t[k].to(torch.int32)))
    n = json.loads((saved / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(PlanError, match="stored as I32"):
        apply_checkpoint(saved, Plan(drop_experts={i: [1] for i in range(n)}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,words", [
    (lambda L: L["moe"].__setitem__("99", L["moe"]["0"]), "names layer 99, which is not an MoE layer"),
    (lambda L: L["moe"].__setitem__("-3", L["moe"]["0"]), "names layer -3, which is not an MoE layer"),
    (lambda L: L["moe"]["0"].__setitem__("num_experts", -3), "num_experts -3; expected a positive whole number"),
    (lambda L: L["moe"]["0"].__setitem__("intermediate", 2.5), "intermediate 2.5; expected a positive whole"),
    (lambda L: L.__setitem__("dropped_moe_sublayers", [7]), "names layer 7, which is not an MoE layer"),
    (lambda L: L.__setitem__("moe", [1, 2]), "not a layout written by export"),
])
def test_a_damaged_layout_file_is_said_in_words(small, tmp_path, edit, words):
    """Exports of earlier versions (in-memory key names beside explorer_layout.json) still load, and damage to
    their layout file is said in words; today's exports record per-layer shapes in config.json (test_engines)."""
    from safetensors.torch import save_model

    model, view = small
    plan = Plan(drop_experts={0: [1]})
    new, _, layout = apply_plan(model, view, plan)
    out = tmp_path / "exp"
    out.mkdir()
    new.config.save_pretrained(out)
    save_model(new, str(out / "model.safetensors"))
    (out / "explorer_layout.json").write_text(json.dumps(layout))
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(out, device="cpu", with_tokenizer=False)[0](ids).logits, new(ids).logits)
    f = out / "explorer_layout.json"
    layout = json.loads(f.read_text())
    edit(layout)
    f.write_text(json.dumps(layout))
    with pytest.raises(ModelLoadError, match=words):
        load_model(out, device="cpu", with_tokenizer=False)


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model("org/some-model", device="cpu")
    assert time.perf_counter() - t < 15  # not the 29 s of retries


def test_binary_text_and_long_blocks(capsys, saved, tmp_path):
    from transformers import AutoTokenizer

    from explorer.data import DataError, load_data

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 200)
    with pytest.raises(DataError, match="does not look like text"):
        load_data(tok, str(tmp_path / "blob.txt"))
    code, _, err = cli(capsys, "eval", saved, "--data", ROOT / "assets" / "corpus" / "code" / "eval.txt",
                       "--block-len", "512", "--max-tokens", "1024")
    assert code == 2 and "exceeds the model's maximum positions (256)" in err  # refused, not only warned


class _CountingTokenizer:
    """The demo tokenizer, counting the characters it is given."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_the_token_cap_applies_while_reading(tmp_path):
    from transformers import AutoTokenizer

    from explorer.data import load_data

    one = (ROOT / "assets" / "corpus" / "code" / "eval.txt").read_text("utf-8")
    big = tmp_path / "big.txt"
    big.write_text(one * (20_000_000 // len(one) + 1), encoding="utf-8")  # 20 MB of real text
    tok = _CountingTokenizer(AutoTokenizer.from_pretrained(DEMO_MODEL))
    ds = load_data(tok, str(big), block_len=128, max_tokens=1024)
    assert ds.calib.tokens > 0.9 * 1024 and ds.eval.tokens > 0.9 * 1024  # the cap is still met
    assert tok.chars < 200_000  # a few hundred kilobytes tokenised, not 20 MB


def test_a_tokenizer_that_does_not_fit_the_model_is_said(capsys, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "small-vocab"
    tiny_model("olmoe", seed=2, vocab_size=64).save_pretrained(src)  # the demo tokenizer's ids run far past 64
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(src)
    code, _, err = cli(capsys, "eval", src, "--max-tokens", "256")
    assert code == 2 and "does not fit the model" in err and "64 token embeddings" in err


@pytest.mark.slow
def test_cli_diverging_distillation_says_so(capsys, demo, tmp_path):
    (tmp_path / "plan.json").write_text('{"drop_experts": {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}}')
    code, out, err = cli(capsys, "distill", tmp_path / "plan.json", "--lr", "1", "--steps", "4", "--eval-every",
                         "2", "--max-tokens", "512", "--block-len", "128", "--out", tmp_path / "d")
    assert code == 3 and "Warning: distillation" in err and "weights kept are" in err
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["warning"] and summary["kept_step"] in (0, 2, 4)
    numbers = re.findall(r"perplexity (\S+?)[ ,)\n]", out)
    assert len(numbers) >= 3 and all(len(n) < 12 for n in numbers), numbers  # 2.37e+55, not 56 digits


def test_export_files_follow_the_umask(tmp_path):
    """safetensors writes 0600: other users and serving containers could not read model.safetensors. Every export
    (plain, packed 4-bit, out of core) is written with the umask's modes."""
    from explorer.checkpoint import apply_checkpoint

    mask = os.umask(0o022)
    os.umask(mask)
    model, tok, view = load_model(device="cpu")
    for name, plan in (("plain", Plan(drop_experts={0: [1]})), ("packed", Plan.from_dict({"quantise": {"bits": 4}}))):
        new, _, layout = apply_plan(model, view, plan)
        out = export(new, tok, plan, tmp_path / name, layout=layout)
        modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
        assert modes["model.safetensors"] == 0o666 & ~mask and set(modes.values()) == {0o666 & ~mask}, (name, modes)
        assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    out = apply_checkpoint(DEMO_MODEL, Plan(drop_experts={i: [1] for i in range(len(view))}), tmp_path / "ooc")
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o666 & ~mask}


def test_a_refused_checkpoint_prints_only_the_refusal(tmp_path):
    """A tensor of the wrong shape or a missing one: the explorer's sentence, not transformers' load-report table
    above it (the command as a user runs it, in its own process)."""
    from safetensors.torch import load_file, save_file

    for case in ("shape", "missing"):
        folder = tmp_path / case
        tiny_model("mixtral", seed=1).save_pretrained(folder)
        sd = load_file(folder / "model.safetensors")
        if case == "shape":
            sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:-8]
        else:
            del sd["model.layers.1.input_layernorm.weight"]
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        run = subprocess.run([sys.executable, "-m", "explorer", "eval", str(folder), "--max-tokens", "256"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode != 0
        err = run.stderr
        assert ("wrong shape" if case == "shape" else "missing from the checkpoint") in err
        assert "LOAD REPORT" not in err and "Traceback" not in err and "Status" not in err, err

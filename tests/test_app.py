"""The Gradio app, launched for real on 127.0.0.1 and driven through gradio_client and a real browser."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_out(tmp_path_factory):
    """Where the app puts each session's relative exports (MOE_EXPLORER_OUT)."""
    return tmp_path_factory.mktemp("app-out")


@contextlib.contextmanager
def launched_app(out: Path, log: Path, *flags: str):
    """app.py for real on a free loopback port with ``flags``; its URL while the block runs."""
    with launched_process(out, log, *flags) as (url, _):
        yield url


@contextlib.contextmanager
def launched_process(out: Path, log: Path, *flags: str):
    """app.py for real on a free loopback port with ``flags``; (URL, process) while the block runs."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "MOE_EXPLORER_OUT": str(out)}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *flags], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start: " + log.read_text())
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def app_url(demo, tmp_path_factory, app_out):
    with launched_app(app_out, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture()
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _idle(page, timeout=120_000):
    """Wait until Gradio shows no running job on the page."""
    page.wait_for_function("() => !document.body.innerText.includes('processing |')", timeout=timeout)


def _load(client):
    """What the Load button does: the model, then the statistics."""
    client.predict("demo", "cpu", "float32", "demo", None, 2048, api_name="/on_load")
    return client.predict(api_name="/on_stats")


def test_model_and_routing(client):
    out = _load(client)
    summary = out[0]
    assert "MixtralForCausalLM" in summary and "Perplexity (evaluation)" in summary and "code" in summary
    assert " ± " in summary and "untrained" not in summary  # the trained demo carries no such warning
    html = client.predict("def f(x):\n    return x", 1, api_name="/on_route")
    assert html.count("<span title=") >= 5 and "layer 1" in html
    vocab = json.loads(out[4]["plot"])  # the vocabulary view: tokens that favour an expert, against a baseline
    assert "Vocabulary specialisation, layer 0" in vocab["layout"]["title"]["text"]
    assert "shuffled ids" in vocab["layout"]["title"]["text"] and len(vocab["data"][0]["y"]) >= 8
    coact, domain, vocab3 = client.predict(3, api_name="/on_layer")
    assert "layer 3" in json.loads(vocab3["plot"])["layout"]["title"]["text"]
    assert "its overall share" in json.loads(domain["plot"])["layout"]["title"]["text"]


def test_saliency_plan_preview_and_errors(client):
    from gradio_client.exceptions import AppError

    _load(client)
    bars, stability, sim, importance = client.predict(["frequency", "reap", "ablation"], 1, "mean-output", False,
                                                      api_name="/on_saliency")
    # each criterion's ranking on the two calibration halves: error bars, the layer's rho in the legend, a sentence
    traces = json.loads(bars["plot"])["data"]
    assert [t["name"].split(" (")[0] for t in traces] == ["frequency", "reap", "ablation"]
    assert "halves" in traces[1]["name"] and "array" in traces[1]["error_y"] and "error_y" not in traces[2]
    assert "reap: ranks agree across the two calibration halves with Spearman" in stability
    assert "ablation: not tested across halves" in stability
    res = client.predict("drop-experts", 0.25, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    msg, md, plan_json = res[0], res[1], res[2]
    assert msg == "" and "Preview perplexity" in md and '"drop_experts"' in plan_json
    res = client.predict('{"drop_experts": {"0": [0,1,2,3,4,5,6,7]}}', api_name="/on_json")
    assert "removes every expert" in res[0]  # one message; the other components keep their values
    with pytest.raises(AppError, match="not found"):
        client.predict("/no/such/model", "cpu", "float32", "demo", None, 2048, api_name="/on_load")
    with pytest.raises(AppError, match="too short|no .txt"):
        client.predict(str(ROOT / "tests"), None, 2048, api_name="/on_data")
    # the session is still usable after the errors
    res = client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    assert res[0] == "" and "Preview perplexity" in res[1]


def test_plan_errors_are_one_readable_message(client):
    """Malformed JSON keeps its line and column, and a parser's '<stream end>' is shown as text, not eaten as HTML."""
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    res = client.predict('{"drop_experts": {"0": [1,}', api_name="/on_json")
    assert "not valid JSON" in res[0] and "line 1, column" in res[0]
    res = client.predict("drop_experts: [1", api_name="/on_json")
    assert "line 1, column" in res[0] and "&lt;stream end&gt;" in res[0] and "<stream end>" not in res[0]


def test_presets_say_what_they_replace_and_prune_counts_zeros(client):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    res = client.predict("prune", 0.5, "reap", "moe-pruner", "uniform", False, api_name="/on_preset")
    assert "replaced your earlier plan" in res[0] and "drop L0:e1/e2" in res[0]
    assert "non-zero after pruning" in res[1] and "-0.0%" not in res[1]
    res = client.predict("merge", 10, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    assert "between 2 and 7 on this model, got 10" in res[0]
    table, fig, _ = client.predict(api_name="/on_compare_tab")  # drawn again when the tab shows
    assert table["data"] and json.loads(fig["plot"])["data"]


def test_quantise_preset_and_bytes_on_the_pareto_chart(client):
    _load(client)
    client.predict("drop-experts", 0.25, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    res = client.predict("quantise", 4, "reap", "experts only", "uniform", False, api_name="/on_preset")
    assert "replaced your earlier plan" in res[0] and "with packed experts" in res[1]
    table, fig, _ = client.predict(api_name="/on_compare_tab")
    rows = {r[0]: r for r in table["data"]}
    cols = table["headers"]
    q = next(r for name, r in rows.items() if "4-bit" in name)
    d = next(r for name, r in rows.items() if "drop" in name)
    size = cols.index("size (MiB)")
    assert q[cols.index("parameters")] != d[cols.index("parameters")] and float(q[size]) < float(d[size])
    by_bytes = json.loads(client.predict("bytes", api_name="/on_pareto_x")["plot"])
    assert by_bytes["layout"]["xaxis"]["title"]["text"].startswith("bytes")
    xs = sorted(x for t in by_bytes["data"] if t.get("legendgroup") == "plans" for x in t["x"])
    assert xs[0] < 0.5 * xs[-1]  # the quantised plan is far smaller in bytes, though it keeps every parameter
    by_params = json.loads(client.predict("params", api_name="/on_pareto_x")["plot"])
    assert by_params["layout"]["xaxis"]["title"]["text"] == "parameters"
    # GPTQ from the same preset: the session collects the experts' Hessians and previews it (issue 27)
    res = client.predict("quantise", 3, "reap", "experts only, by GPTQ", "uniform", False, api_name="/on_preset")
    assert "Preview perplexity" in res[1] and '"method": "gptq"' in res[2], res[0]


def test_task_accuracy_columns_and_pareto_axis(client):
    """Scoring tasks from the Compare tab: a column per task (the original's accuracy in its header), the Pareto
    chart's quality axis offers each task, and an unknown task is a message, not a traceback."""
    pytest.importorskip("lm_eval")
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2], "1": [3, 4]}}', api_name="/on_json")
    table, ychoices, fig = client.predict("demo_next_line_code,demo_next_word", 30, api_name="/on_score_tasks")
    cols = table["headers"]
    code = next(c for c in cols if c.startswith("demo_next_line_code (orig "))
    assert any(c.startswith("demo_next_word (orig ") for c in cols)
    row = next(r for r in table["data"] if "drop" in r[0])
    assert 0 <= float(row[cols.index(code)]) <= 100
    assert " ± " in code and 0 < float(row[cols.index("demo_next_line_code ± (1 s.e.)")]) < 20  # issue 32
    assert "task:demo_next_line_code" in [c[1] for c in ychoices["choices"]]
    by_task = json.loads(client.predict("task:demo_next_line_code", api_name="/on_pareto_y")["plot"])
    assert by_task["layout"]["yaxis"]["title"]["text"].startswith("demo_next_line_code accuracy")
    shown = [t for t in by_task["data"] if t.get("legendgroup") == "plans" or t["name"] == "original"]
    ys = [y for t in shown for y in t["y"]]
    assert ys and all(0 <= y <= 1 for y in ys)
    assert all(t["error_y"]["array"][0] > 0 for t in shown)
    with pytest.raises(Exception, match="unknown lm-eval task"):
        client.predict("no_such_task_here", 10, api_name="/on_score_tasks")
    md = client.predict("demo_next_word", 20, api_name="/on_score_plan_tasks")
    assert md.startswith("| task | original | plan | change |") and "demo_next_word" in md


def test_generation_side_by_side(client):
    """The app shows the library's greedy continuations of the original and of the plan's preview, prompt by
    prompt (the escaped newline of the second prompt read as a newline), and the plan changes them."""
    from explorer import load_model
    from explorer.figures import side_by_side_html
    from explorer.plan import Plan
    from explorer.tasks import side_by_side

    _load(client)
    client.predict('{"drop_layers": [0, 1, 2]}', api_name="/on_json")
    html = client.predict("In the beginning\ndef f(x):\\n", 8, api_name="/on_generate")
    model, tok, view = load_model(device="cpu")
    rows = side_by_side(model, view, Plan(drop_layers=[0, 1, 2]), tok, ["In the beginning", "def f(x):\n"], None, 8)
    assert html == side_by_side_html(rows)
    assert any(r["original"] != r["preview"] for r in rows)  # dropping three MoE layers changes what it writes


def test_download_gives_the_current_plan(client):
    _load(client)
    for plan in ('{"drop_experts": {"0": [1, 2]}}', '{"drop_experts": {"1": [3]}}'):
        res = client.predict(plan, api_name="/on_json")
        path = res[-1]  # the download button's file, set with every change of the plan
        assert path and json.loads(Path(path).read_text())["drop_experts"] == json.loads(plan)["drop_experts"]


def test_compare_marks_plans_measured_on_other_text(client, tmp_path):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    res = client.predict('{"drop_experts": {"1": [3]}}', api_name="/on_json")
    assert all(r[-1] == "current text" for r in res[5]["data"])
    head = res[5]["headers"]  # every compared perplexity with its standard error and its paired change
    for r in res[5]["data"]:
        assert r[head.index("± (1 s.e.)")] > 0 and " ± " in r[head.index("vs original")]
    text = tmp_path / "mine.txt"
    text.write_text((ROOT / "assets" / "corpus" / "code" / "eval.txt").read_text()[:60_000])
    client.predict(str(text), None, 512, api_name="/on_data")
    out = client.predict(api_name="/on_stats")
    table, fig = out[14], out[15]
    # the plan in force is previewed again on the new text; the other one is marked and left off the chart
    rows = {r[0]: r[-1] for r in table["data"]}
    assert rows == {"drop L0:e1/e2": "earlier text: stale, re-measure", "drop L1:e3": "current text"}
    plotted = [t for t in json.loads(fig["plot"])["data"] if t.get("legendgroup") == "plans"]
    assert len(plotted) == 1 and plotted[0]["text"] == ["drop L1:e3"]
    table, fig = client.predict(api_name="/on_remeasure")
    assert [r[-1] for r in table["data"]] == ["current text"] * 2
    assert any(t.get("legendgroup") == "plans" for t in json.loads(fig["plot"])["data"])


def test_export_never_deletes_what_it_did_not_write(client, app_out, tmp_path):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    assets = sorted(p.name for p in (ROOT / "assets").iterdir())
    for folder in (str(other), str(ROOT / "assets"), str(ROOT), str(Path.home())):
        msg, f = client.predict(folder, True, api_name="/on_export")
        assert msg.startswith("⚠️") and f is None, folder
    assert (other / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in (ROOT / "assets").iterdir()) == assets
    assert (ROOT / "assets" / "demo-moe" / "model.safetensors").exists()
    # an empty field goes under this session's own output folder, never the server's working directory
    msg, _ = client.predict("", False, api_name="/on_export")
    assert "Written to" in msg and str(app_out) in msg and not (ROOT / "compressed").exists()
    written = Path(msg.split("`")[1])
    assert {"plan.json", "summary.json"} <= {p.name for p in written.iterdir()}
    # a new error replaces the old "Written to" line
    msg, _ = client.predict("", False, api_name="/on_export")
    assert "Written to" not in msg and "not empty" in msg
    msg, _ = client.predict("", True, api_name="/on_export")  # replacing a previous export is allowed
    assert "Written to" in msg


def test_a_clicks_preview_leaves_the_table_and_controls_live():
    """Issue 32: the preview after a click wrote the load table and the Plan tab's controls too, so Gradio locked
    them while each preview ran and picking experts stalled on every click. Now it writes only what it measures,
    and a newer click cancels a stale preview."""
    import app as app_module

    cfg = app_module.build().config
    label = {c["id"]: c.get("props", {}).get("label") for c in cfg["components"]}
    deps = cfg["dependencies"]
    refresh = next(i for i, d in enumerate(deps) if d.get("api_name") == "on_refresh")
    written = {label[o] for o in deps[refresh]["outputs"]}
    assert "expert load (x uniform): click a cell" not in written and not any("drop MoE" in (w or "") for w in written)
    assert "size against perplexity" in written
    table = next(i for i, lab in label.items() if lab == "expert load (x uniform): click a cell")
    cancel = [d for d in deps if refresh in (d.get("cancels") or [])]
    assert cancel and any(t[0] == table and t[1] == "select" for d in cancel for t in d["targets"])


def test_compare_rows_can_be_removed(client):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    client.predict('{"drop_experts": {"1": [3]}}', api_name="/on_json")
    table, _ = client.predict(api_name="/on_remove_tried")  # the plan in force: the last one made
    assert [r[0] for r in table["data"]] == ["drop L0:e1/e2"]
    table, _ = client.predict(api_name="/on_clear_tried")
    assert not table["data"]


def test_compare_times_every_plan_and_draws_the_time_axis(client):
    """Issue 27: one button times the original and every plan tried (speed and memory as ratios, with their
    spread), the Compare table gets the columns, the Pareto chart a measured time axis, and the note says what the
    kernels cannot speed up."""
    _load(client)
    client.predict('{"drop_layers": [2]}', api_name="/on_json")
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    table, fig, note = client.predict(api_name="/on_speed")
    col = table["headers"].index("speed: prefill · decode (x orig)")
    assert all(" · " in r[col] and " ± " in r[col] for r in table["data"]), table["data"]
    assert "Timed on cpu" in note and "not FLOPs per token" in note
    timed = json.loads(client.predict("time", api_name="/on_pareto_x")["plot"])
    assert timed["layout"]["xaxis"]["title"]["text"].startswith("decode time per token")
    assert sum(len(t["x"]) for t in timed["data"] if t.get("legendgroup") == "plans") == 2
    client.predict("params", api_name="/on_pareto_x")


def test_the_why_panel_explains_an_expert_and_a_layer(client):
    _load(client)
    text = client.predict(1, 3, api_name="/on_why_expert")
    assert "Expert 3 of MoE layer 1" in text and "rank in its layer" in text and "against chance" in text
    text = client.predict(2, api_name="/on_why_layer")
    assert "MoE layer 2" in text and "dropping its MoE sub-layer" in text and "±" in text


def test_each_preset_has_its_own_controls_and_ranges(client):
    """Issue 32: one amount box and one method box for every preset accepted "merge to 0", 0 bits and a quantise
    "method" mc-smoe; now each preset says what its amount means and its range on this model, offers only its own
    methods (no shared-expert option on Mixtral), shows only the controls it reads, and refuses in words outside."""
    _load(client)
    amount, crit, method, mode, protect = client.predict("merge", api_name="/on_preset_kind")
    assert "experts each layer keeps" in amount["label"] and "(2 to 7)" in amount["label"] and amount["value"] == 4
    assert method["visible"] and method["choices"] == [["mc-smoe", "mc-smoe"], ["hc-smoe", "hc-smoe"]]
    assert crit["visible"] is False and mode["visible"] is False
    amount, crit, method, mode, protect = client.predict("quantise", api_name="/on_preset_kind")
    assert "bits" in amount["label"] and [c[0] for c in method["choices"]] == ["experts only", "experts only, by GPTQ",
                                                                             "+ attention 8-bit"]
    for args, words in [(("quantise", 0, "experts only"), "between 2 and 8"),
                        (("drop-blocks", 0, "experts only"), "between 1 and 3")]:
        res = client.predict(args[0], args[1], "reap", args[2], "uniform", False, api_name="/on_preset")
        assert words in res[0], (args, res[0])
    with pytest.raises(Exception, match="not in the list of choices"):  # the quantise preset offers no mc-smoe
        client.predict("quantise", 4, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    client.predict("merge", api_name="/on_preset_kind")
    res = client.predict("merge", 0, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    assert "between 2 and 7" in res[0]
    res = client.predict("drop-blocks", 1, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    assert "Preview perplexity" in res[1]  # a hidden control's value (the method) is not read


def test_the_export_says_which_engines_load_it_and_writes_the_chosen_form(client, tmp_path):
    """Issue 31: the engine line stands above the export buttons, per plan and form; Compare says where each plan
    loads; the padded form is refused in words where the demo's router would pick padded experts."""
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")  # one layer cut: counts differ
    table, _, engines = client.predict(api_name="/on_compare_tab")
    assert "✗ vLLM / SGLang" in engines and "trust_remote_code" in engines and "✓ transformers" in engines
    cols = table["headers"]
    row = next(r for r in table["data"] if "L0:e1/e2" in r[0])
    assert "remote code" in row[cols.index("loads in")] and "padding would change routing" in row[cols.index("loads in")]
    said = client.predict("padded", api_name="/on_form")
    assert "cannot hold this plan exactly" in said and "no selection bias" in said
    msg, _ = client.predict(str(tmp_path / "padded"), False, "padded", api_name="/on_export")
    assert "Written to" not in msg and "no selection bias" in msg and not (tmp_path / "padded").exists()
    msg, _ = client.predict(str(tmp_path / "per-layer"), False, "per-layer", api_name="/on_export")
    assert "Written to" in msg
    cfg = json.loads((tmp_path / "per-layer" / "config.json").read_text())
    assert cfg["auto_map"] and (tmp_path / "per-layer" / "modeling_explorer.py").exists()
    client.predict('{"drop_experts": {"0": [1], "1": [1], "2": [1], "3": [1]}}', api_name="/on_json")
    _, _, engines = client.predict(api_name="/on_compare_tab")
    assert "✓ vLLM / SGLang" in engines and "✓ llama.cpp" in engines and "trust_remote_code" not in engines


def test_the_app_sweeps_in_one_click(client):
    """Issue 32: a criterion x amount grid drawn with its error bars, and the grid as a CSV download."""
    import csv

    _load(client)
    fig, f = client.predict(["drop", "slim"], "params", api_name="/on_sweep")
    data = json.loads(fig["plot"])["data"]
    assert {"drop (reap)", "drop (frequency)", "drop (random)", "slim", "original"} <= {t.get("name") for t in data}
    assert all(t["error_y"]["array"] for t in data if t.get("name") != "original")
    with open(f) as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["series"] == "original" and len(rows) == 1 + 3 * 4 + 3


def test_a_session_saved_in_the_app_opens_in_a_notebook_and_back(client, tmp_path):
    """Issue 32: the session (statistics, plans, measurements) to one file from the app; Session.open in a
    notebook finds what the app had; the app opens it again, and a file that is not a session changes nothing."""
    import shutil

    from gradio_client import handle_file

    from explorer.session import Session

    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    client.predict('{"drop_experts": {"1": [3]}}', api_name="/on_json")
    msg, f = client.predict(api_name="/on_save_session")
    assert "Saved: 2 plan(s)" in msg, msg
    keep = tmp_path / "from-app.moe-session.zip"
    shutil.copy(f, keep)
    nb = Session.open(keep, device="cpu")  # what a notebook does
    assert [e["name"] for e in nb.tried] == ["drop L0:e1/e2", "drop L1:e3"]
    assert nb.plan.drop_experts == {1: [3]} and not any(e["stale"] for e in nb.compared())
    nb.preview(nb.plan)  # and it is a working session there
    msg, table, _ = client.predict(handle_file(str(keep)), api_name="/on_open_session")
    assert "2 plan(s) tried" in msg and len(table["data"]) == 2
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    msg, table2, _ = client.predict(handle_file(str(bad)), api_name="/on_open_session")
    assert "not a session saved by the explorer" in msg


def test_distill_and_export(client, tmp_path):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2], "1": [0, 5]}}', api_name="/on_json")
    status, fig, table, pareto = client.predict(8, 1e-3, 1.0, "forward", "all", 4, api_name="/on_distill")
    assert "done" in status and "best" in status and "recovered" in status
    names = [t.get("name") for t in json.loads(fig["plot"])["data"]]
    assert "teacher (original)" in names and "cut, not distilled" in names  # the reference lines
    assert any("distilled (8 steps)" in r[0] for r in table["data"])  # the student stands in Compare...
    assert any(t.get("name") == "distilled" for t in json.loads(pareto["plot"])["data"])  # ...and on the chart
    msg, _ = client.predict(str(tmp_path / "exp"), False, api_name="/on_export")
    assert "Written to" in msg and "the distilled student" in msg
    assert {"plan.json", "summary.json", "config.json"} <= {p.name for p in (tmp_path / "exp").iterdir()}
    msg, f = client.predict(api_name="/on_zip")
    assert f and str(f).endswith(".zip")


@pytest.mark.browser
def test_in_a_real_browser(app_url, tmp_path, chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.get_by_text("Perplexity (evaluation)").wait_for(timeout=120_000)  # loaded and statistics collected
        assert "beforeunload" in page.content()  # a reload asks before the session's plans are lost
        _idle(page)
        page.screenshot(path=str(tmp_path / "1-model.png"), full_page=True)
        page.get_by_role("tab", name="Routing").click()
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Show routing", exact=True).click()
        page.locator(".token-strip").wait_for(timeout=30_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "2-routing.png"), full_page=True)
        page.get_by_role("tab", name="Saliency").click()
        page.get_by_role("button", name="Score experts", exact=True).click()
        page.wait_for_timeout(1000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "3-saliency.png"), full_page=True)
        page.get_by_role("tab", name="Plan").click()
        page.locator('[data-testid="cell-1-3"]').wait_for(timeout=30_000)
        before = page.locator("body").inner_text()
        assert "Empty plan" in before
        red = "e => getComputedStyle(e).backgroundColor === 'rgb(255, 138, 128)'"
        for row, col in ((1, 3), (2, 5)):  # drop two experts by clicking their cells
            cell = page.locator(f'[data-testid="cell-{row}-{col}"]')
            cell.click()
            # the clicked cell turns red at once, before the preview (its own step) is measured
            page.wait_for_function(f"() => ({red})(document.querySelector('[data-testid=cell-{row}-{col}]'))",
                                   timeout=5_000)
            if (row, col) == (1, 3):  # red while the first preview is still being measured (it takes seconds)
                assert "Preview perplexity" not in page.locator("body").inner_text()
            page.wait_for_timeout(2000)
        page.get_by_text("Preview perplexity").wait_for(timeout=60_000)
        _idle(page)
        text = page.locator("body").inner_text()
        assert "Preview perplexity" in text and "Empty plan" not in text
        page.get_by_label("pick for a merge group").check()  # now pick two experts of layer 3 and merge them
        for col in (1, 2):
            page.locator(f'[data-testid="cell-3-{col}"]').click()
            page.wait_for_timeout(1000)
        page.get_by_text("Picked in layer 3").wait_for(timeout=30_000)
        page.get_by_role("button", name="Merge the picked experts", exact=True).click()
        page.get_by_text("experts per MoE layer [8, 7, 7, 7]").wait_for(timeout=60_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "4-plan.png"), full_page=True)
        with page.expect_download() as dl:  # the first click gives the plan in force, not nothing or an older one
            page.get_by_role("button", name="Download plan.json", exact=True).click()
        got = json.loads(Path(dl.value.path()).read_text())
        assert got["drop_experts"] == {"1": [2], "2": [4]} and got["merge"] == {"3": [[0, 1]]}
        page.get_by_role("tab", name="Distill").click()
        page.get_by_label("steps").fill("12")
        page.get_by_label("evaluate every").fill("3")
        page.get_by_role("button", name="Start distillation", exact=True).click()
        page.get_by_text("done").first.wait_for(timeout=180_000)
        n_points = page.evaluate("""() => { const g = [...document.querySelectorAll('.js-plotly-plot')]
            .filter(d => d.offsetParent !== null).pop(); if (!g) return 0;
            const t = g.data.find(t => t.name === 'perplexity'); return t ? t.x.length : 0; }""")
        assert n_points >= 4  # the start plus one point per evaluation
        page.screenshot(path=str(tmp_path / "5-distill.png"), full_page=True)
        page.get_by_role("tab", name="Compare & export").click()
        page.wait_for_function("() => document.body.innerText.includes('+ distilled (12 steps)')",
                               timeout=30_000)  # the distilled student's row in Compare...
        page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')].some(
            g => g.offsetParent !== null && (g.data || []).some(t => t.name === 'distilled'))""",
                               timeout=30_000)  # ...and its point on the Pareto chart
        page.screenshot(path=str(tmp_path / "6-compare.png"), full_page=True)
        page.locator('[data-testid="cell-0-0"]:visible').click()  # another plan: the distilled student is kept
        page.get_by_role("tab", name="Plan").click()
        page.get_by_text("Distilled students are kept").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Compare & export").click()
        page.locator('[data-testid="cell-3-0"]:visible').click()  # the distilled plan's row brings it back
        page.get_by_role("tab", name="Plan").click()
        page.get_by_text("its distilled student").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Compare & export").click()
        page.get_by_label("export folder").fill(str(ROOT / "assets"))  # the folder holding the loaded model
        page.get_by_label("replace a previous export there").check()
        page.get_by_role("button", name="Export to folder", exact=True).click()
        page.get_by_text("contains the input model").wait_for(timeout=60_000)
        page.get_by_label("replace a previous export there").uncheck()
        page.get_by_label("export folder").fill(str(tmp_path / "browser-export"))
        page.get_by_role("button", name="Export to folder", exact=True).click()
        page.get_by_text("Written to").wait_for(timeout=120_000)
        page.screenshot(path=str(tmp_path / "7-export.png"), full_page=True)
        browser.close()
    assert (tmp_path / "browser-export" / "plan.json").exists()
    for f in sorted(tmp_path.glob("*.png")):
        print("screenshot:", f)


@pytest.mark.browser
def test_every_tab_on_a_model_that_is_not_the_demo(tmp_path, chromium_path):
    """The app started on another family (Qwen2-MoE: a shared expert, router weights not renormalised, 3 x 8), walked
    tab by tab in a real browser as a user would: statistics, routing of a text, saliency with its stability and
    the Why panel, a click-made plan previewed, a short distillation, its row in Compare and an export."""
    from playwright.sync_api import sync_playwright
    from transformers import AutoTokenizer

    from conftest import CHROMIUM_ARGS
    from explorer.assets import DEMO_MODEL
    from explorer.tiny import tiny_model

    folder = tmp_path / "qwen2-moe"
    tiny_model("qwen2_moe", seed=0, vocab_size=4096).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    with launched_app(tmp_path / "out", tmp_path / "app.log", "--model", str(folder)) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("Perplexity (evaluation)").wait_for(timeout=180_000)
        _idle(page)
        body = page.locator("body").inner_text()
        assert "Qwen2MoeForCausalLM" in body and "3 MoE layers" in body and "demo-moe" not in body
        page.screenshot(path=str(tmp_path / "1-model.png"), full_page=True)
        page.get_by_role("tab", name="Routing").click()
        page.get_by_role("button", name="Show routing", exact=True).click()
        page.locator(".token-strip").wait_for(timeout=30_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "2-routing.png"), full_page=True)
        assert page.locator(".js-plotly-plot").filter(visible=True).count() >= 3, \
            page.locator(".js-plotly-plot").filter(visible=True).count()
        page.get_by_role("tab", name="Saliency").click()
        page.get_by_role("button", name="Score experts", exact=True).click()
        page.wait_for_function("() => document.querySelector('#rank-stability').innerText.includes('Spearman')",
                               timeout=60_000)
        page.get_by_text("Why: one expert or one layer").click()
        page.get_by_role("button", name="Why this expert", exact=True).click()
        page.wait_for_function("() => document.querySelector('#why').innerText.includes('Expert 0 of MoE layer 0')",
                               timeout=30_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "3-saliency.png"), full_page=True)
        page.get_by_role("tab", name="Plan").click()
        page.locator('[data-testid="cell-1-3"]').wait_for(timeout=30_000)
        page.locator('[data-testid="cell-1-3"]').click()
        page.get_by_text("Preview perplexity").wait_for(timeout=60_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "4-plan.png"), full_page=True)
        page.get_by_role("tab", name="Distill").click()
        page.get_by_label("steps").fill("4")
        page.get_by_label("evaluate every").fill("2")
        page.get_by_role("button", name="Start distillation", exact=True).click()
        page.get_by_text("done").first.wait_for(timeout=180_000)
        page.screenshot(path=str(tmp_path / "5-distill.png"), full_page=True)
        page.get_by_role("tab", name="Compare & export").click()
        page.wait_for_function("() => document.body.innerText.includes('+ distilled (4 steps)')", timeout=30_000)
        page.get_by_label("export folder").fill(str(tmp_path / "export"))
        page.get_by_role("button", name="Export to folder", exact=True).click()
        page.get_by_text("Written to").wait_for(timeout=120_000)
        page.screenshot(path=str(tmp_path / "6-compare.png"), full_page=True)
        browser.close()
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["model_type"] == "qwen2_moe" and (tmp_path / "export" / "plan.json").exists()
    for f in sorted(tmp_path.glob("*.png")):
        print("screenshot:", f)


def test_loading_another_model_says_which_and_what_it_cleared(client, tmp_path):
    """Pressing Load names the model that loads (not "the demo") and takes the previous model's charts off the
    screen; the plans tried on the previous model leave Compare with a sentence saying so."""
    from transformers import AutoTokenizer

    from explorer.assets import DEMO_MODEL
    from explorer.tiny import tiny_model

    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")  # one plan tried on the demo
    other = tmp_path / "other-moe"
    tiny_model("qwen3_moe", seed=0, vocab_size=4096).save_pretrained(other)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(other)
    shown = client.predict(str(other), api_name="/on_loading")
    assert shown[0] == f"Loading `{other}`…" and all(x is None for x in shown[1:])
    assert client.predict("demo", api_name="/on_loading")[0] == "Loading the demo model…"
    res = client.predict(str(other), "cpu", "float32", "demo", None, 512, api_name="/on_load")
    summary = res[-1] if isinstance(res, (list, tuple)) else res
    assert "The 1 plan(s) tried on the previous model (demo-moe) were cleared from Compare" in summary
    summary = client.predict(api_name="/on_stats")[0]
    assert "Qwen3MoeForCausalLM" in summary
    # a randomly initialised model: its routing describes nothing learned, and the summary says so with its numbers
    assert "no better than an untrained model" in summary and "4,096-token vocabulary" in summary

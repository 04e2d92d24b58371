"""Speed and memory of a plan (issue 27): measured against the original in the same run, with the pairs' spread;
the weights ratio exact; what transformers' kernels cannot speed up said in words, never shown as a win; the
Compare rows, the Pareto chart's time axis and the command line carry the figures. No timing is asserted: timings
are the benchmark's (bench/plan_speed.py), and a test only checks what could be wrong whatever the machine."""
import json

import pytest
import torch

from explorer.moe import MoEModel
from explorer.plan import Plan
from explorer.speed import limits, measure, speed_of_plan
from explorer.tiny import random_blocks, tiny_model


def _params_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def test_a_layer_drop_is_timed_against_the_original_with_exact_weights():
    from explorer.apply import apply_plan

    model = tiny_model("mixtral", seed=0).eval()
    view = MoEModel(model)
    blocks = random_blocks(8, 32, 0, vocab=64)
    one = measure(model, blocks, batch=4, new_tokens=6)
    assert one.prefill > 0 and one.decode_1 > 0 and one.decode_b > 0 and one.batch == 4 and one.block_len == 32
    assert one.weight_bytes == _params_bytes(model) and one.peak_bytes >= one.weight_bytes
    plan = Plan(drop_layers=[1])
    r = speed_of_plan(model, view, plan, blocks, repeats=3, batch=4)
    cut, _, _ = apply_plan(model, view, plan)
    assert r.weights == pytest.approx(_params_bytes(cut) / _params_bytes(model))
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in (r.prefill, r.decode_1, r.decode_b, r.peak))
    assert set(r.spread) == {"prefill", "decode_1", "decode_b", "peak"} and all(v >= 0 for v in r.spread.values())
    assert r.limits == [] and "prefill" in r.short() and "(batch 4)" in r.short()


def test_what_the_kernels_cannot_speed_up_is_said():
    view = MoEModel(tiny_model("mixtral", seed=0))
    said = lambda d: " ".join(limits(Plan.from_dict(d), view))  # noqa: E731
    assert "not FLOPs per token" in said({"drop_experts": {"0": [1]}})
    assert "not FLOPs per token" in said({"merge": {"0": [[0, 1]]}})
    assert "computed dequantised" in said({"quantise": {"bits": 4, "group_size": 16}})
    assert "sparse kernels" in said({"prune": {"sparsity": 0.5, "method": "wanda"}})
    assert said({"drop_layers": [1]}) == "" and said({"slim": 0.5}) == ""


@pytest.fixture(scope="module")
def session(demo):
    from conftest import demo_session

    return demo_session(demo, 1024)


def test_the_session_times_every_plan_for_compare_and_the_time_axis(session):
    from explorer import figures

    s = session
    s.preview(Plan(drop_layers=[1, 2]))
    s.preview(Plan(drop_experts={0: [1, 2]}))
    done = s.measure_speed(repeats=2)
    assert len(done) >= 2 and all("speed" in e and e["time"] > 0 for e in done)
    cells = figures.speed_cells(done[0]["speed"])
    assert " · " in cells["speed: prefill · decode (x orig)"] and float(cells["memory (x orig)"]) < 1
    fig = figures.pareto_figure(s.comparable(), s.pareto_baseline(), x="time")
    plotted = [t for t in fig.data if t.legendgroup == "plans"]
    assert plotted and all(t.error_x.array is not None for t in plotted)
    assert "not FLOPs per token" in figures.speed_note(done)
    s.preview(Plan(drop_layers=[1, 2]))  # measured again: the row keeps its speed
    assert any("speed" in e for e in s.tried if e["plan"] == Plan(drop_layers=[1, 2]).to_dict())


def test_the_command_line_times_a_plan_and_refuses_it_layer_by_layer(demo, tmp_path, capsys):
    from explorer.cli import main

    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"drop_layers": [1]}))
    small = ["--max-tokens", "512", "--block-len", "128", "--speed-repeats", "2"]
    assert main(["preview", "demo", str(plan), "--speed", *small]) == 0
    out = capsys.readouterr().out
    assert "speed of the applied plan against the original" in out and "weights 0.7" in out
    assert main(["eval", "demo", "--speed", *small]) == 0
    assert "decode" in capsys.readouterr().out
    assert main(["eval", "demo", "--speed", "--sequential", *small]) == 2
    assert "--speed runs the whole model" in capsys.readouterr().err

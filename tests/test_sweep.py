"""Sweeps (issue 32): a criterion x amount grid from one statistics pass, each point previewed with its standard
error, as one call in a notebook (Session.sweep, the widgets' Sweep tab), one click in the app and one command
(`explorer sweep`), which writes the grid as CSV beside the figure."""
import csv
import io

import pytest

from explorer.cli import main
from explorer.figures import sweep_figure
from explorer.loading import DEMO_MODEL
from explorer.preview import preview_perplexity
from explorer.sweep import csv_text, sweep_plans


@pytest.fixture(scope="module")
def session(demo):
    from conftest import demo_session

    return demo_session(demo, max_tokens=512)


def test_a_sweep_previews_every_point_of_the_grid_with_its_error(session):
    s = session
    points = s.sweep(["drop", "slim", "quantise"], criteria=["reap", "random"], fractions=[0.25, 0.5])
    assert points[0].series == "original" and points[0].ppl == pytest.approx(s.baseline().ppl)
    series = {p.series for p in points[1:]}
    assert series == {"drop (reap)", "drop (random)", "slim", "quantise"}
    plans = {plan.describe(): plan for _, _, plan in sweep_plans(s.stats, s.view, ["drop", "slim", "quantise"],
                                                                   ["reap", "random"], [0.25, 0.5])}
    one = next(p for p in points if p.series == "drop (reap)" and p.amount == 0.5)
    res = preview_perplexity(s.model, s.view, plans[one.plan], s.data.eval, stats=s.stats)
    assert one.ppl == pytest.approx(res.ppl, rel=1e-9) and one.ppl_se == pytest.approx(res.se, rel=1e-9)
    for name in ("drop (reap)", "slim"):  # more removed, fewer parameters
        pts = sorted((p for p in points if p.series == name), key=lambda p: p.amount)
        assert [p.params for p in pts] == sorted((p.params for p in pts), reverse=True)
    q = sorted((p for p in points if p.series == "quantise"), key=lambda p: p.amount)
    assert [p.bytes for p in q] == sorted(p.bytes for p in q) and q[0].bytes < points[0].bytes
    assert all(p.ppl_se > 0 and p.change_se >= 0 for p in points[1:])
    rows = list(csv.DictReader(io.StringIO(csv_text(points))))
    assert len(rows) == len(points) and rows[0]["series"] == "original"
    fig = sweep_figure(points, x="bytes")
    lines = [t for t in fig.data if t.name != "original"]
    assert {t.name for t in lines} == series
    by_params = sweep_figure(points, x="params")  # quantising keeps every parameter: said, not drawn on the star
    assert "quantise" not in {t.name for t in by_params.data} and "against bytes" in by_params.layout.annotations[0].text
    for t in lines:  # every curve starts at the original and carries its error bars
        assert t.x[0] == points[0].bytes and len(t.error_y.array) == len(t.y) and all(e > 0 for e in t.error_y.array)


def test_a_sweep_refuses_what_it_cannot_do_in_words(session):
    from explorer.errors import PlanError

    with pytest.raises(PlanError, match="unknown operation.*prune"):
        session.sweep(["drop", "prune"])
    # merging 8 experts of top-2 to fewer than 2 is not a point of the grid: left out, never guessed
    plans = sweep_plans(session.stats, session.view, ["merge"], fractions=[0.25, 0.9])
    assert [round(a, 3) for _, a, _ in plans] == [0.25]


def test_the_sweep_command_writes_the_grid_and_its_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "demo", "--max-tokens", "512", "--ops", "drop,quantise", "--criteria", "reap",
                 "--fractions", "0.25,0.5", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["series"] for r in rows] == ["original", "drop (reap)", "drop (reap)"] + ["quantise"] * 4
    assert all(float(r["ppl_se"]) > 0 for r in rows)
    html = (out / "sweep.html").read_text()
    assert "Sweep: perplexity against parameters" in html and "<script src=" not in html  # plotly.js inlined: offline
    assert "± " in printed and "-> " in printed
    # never over an earlier sweep without --overwrite, never inside the input model
    assert main(["sweep", "demo", "--max-tokens", "512", "--ops", "drop", "--out", str(out), "--device", "cpu"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["sweep", "demo", "--ops", "drop", "--out", str(DEMO_MODEL / "sweep"), "--device", "cpu"]) == 2
    assert not (DEMO_MODEL / "sweep").exists()


def test_the_widgets_sweep_tab_draws_the_curves(session):
    from explorer.widgets import SweepView

    v = SweepView(session)
    v.ops.value = ("drop",)
    v.run()
    assert "previewed" in v.status.value and not v.err.value
    assert {t.name for t in v.fig.data} >= {"drop (reap)", "drop (frequency)", "drop (random)", "original"}


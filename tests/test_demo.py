"""The quick demo end to end (what CI runs): every phase, the report sections, resumability."""

import json
import shlex
from pathlib import Path

import pytest

from monet_fast.cli import main
from monet_fast.demo import INTERVENTIONS, DemoConfig, run_demo


@pytest.mark.slow
def test_quick_demo_report_and_resume(tmp_path, capsys):
    cfg = DemoConfig.quick_config(tmp_path / "demo")
    run_demo(cfg)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["task"]["n_choices"] == 4 and report["task"]["n_eval"] == cfg.n_eval
    # The main pipeline, then stages 2-3 again with the other feedback_norm.
    names = ["stage1", "stage2", "stage3", "vlpo", "stage2_alt", "stage3_alt"]
    assert [s["name"] for s in report["stages"]] == names
    for stage in report["stages"]:
        assert stage["steps"] >= 1
        assert 0.0 <= stage["accuracy"] <= 1.0
        lo, hi = stage["ci"]
        assert lo <= stage["accuracy"] <= hi and 0.0 <= stage["trigger_rate"] <= 1.0
    for key in ("vlpo_vs_stage3", "feedback_norm"):
        cmp = report["comparisons"][key]
        assert cmp["n"] == cfg.n_eval and cmp["ci"][0] <= cmp["delta"] <= cmp["ci"][1]
    assert report["comparisons"]["feedback_norm_interventions"]["mode"] == "none"
    assert [s["feedback_norm"] for s in report["stages"]][2:] == [
        "match_embeddings", "match_embeddings", "none", "none"
    ]  # fmt: skip
    diag = report["diagnostics"]
    assert diag["latent_mode"] == "auto" and diag["feedback_norm"] == "match_embeddings"
    assert 0.0 <= diag["trigger"]["rate"] <= 1.0 and diag["embedding_norm"] > 0
    assert set(report["interventions"]) == set(INTERVENTIONS)
    for name, run in report["interventions"].items():
        if run.get("skipped"):  # the untrained quick model may open no block: no shuffle donors
            assert name == "shuffle" and "donors" in run["skipped"]
            continue
        assert 0.0 <= run["accuracy"] <= 1.0
        if name != "none":
            assert run["delta"] is not None
    assert {"mean_pairwise_cosine", "effective_rank", "centred"} <= set(report["collapse"])
    assert report["throughput"]["stage1"]["samples_per_s"] > 0
    for f in (
        "report.md",
        "accuracy_by_intervention.png",
        "latent_cosine_heatmap.png",
        "trigger_rate.png",
    ):
        assert (tmp_path / "demo" / "eval" / f).exists()
    assert (tmp_path / "demo" / "eval_alt" / "report.json").exists()
    assert "held-out accuracy" in printed and "intervention" in printed
    assert "VLPO − stage 3" in printed and "trigger rate (auto)" in printed
    assert "mean-centred" in printed and "latent norm / embedding norm" in printed

    # The demo ends with a ready-to-run `generate` command on a saved held-out image; it runs.
    # (The one-step quick model may open no latent block: the trace then says so.)
    command = shlex.split(printed[printed.index("monet-fast generate") :])
    assert command[0] == "monet-fast" and command[-1] == "--latent-trace"
    args = dict(zip(command[2::2], command[3::2]))
    assert Path(args["--image"]).is_file() and Path(args["--model"]).is_dir()
    assert args["--prompt"].startswith("What is the color of the small ")
    assert main(command[1:]) == 0
    generated = capsys.readouterr()
    assert "latent trace" in generated.out and "latent block(s) of K=4" in generated.err

    # A rerun resumes: every phase is already done and is skipped.
    run_demo(cfg)
    assert "done in an earlier run" not in printed
    again = capsys.readouterr().out
    for phase in ("data", "stage1", "stage2", "stage3", "vlpo", "eval", "stage3_alt", "eval_alt"):
        assert f"{phase}: done in an earlier run, skipped" in again
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == report

"""End to end: ``pml-plugins train`` / ``compare`` on digits with a tiny budget leave
metrics.jsonl, test_embeddings.npz, TensorBoard events and report.html that agree with metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pml_plugins.cli import main
from pml_plugins.report import load_test_artifacts, read_metrics_jsonl
from pml_plugins.report.compare_report import COMPARE_SECTIONS
from pml_plugins.report.retrieval import search
from pml_plugins.report.run_report import RUN_SECTIONS

torch.set_num_threads(1)
TINY = ["--epochs", "2", "--iterations-per-epoch", "3", "--batch-size", "32", "--no-progress"]


def test_train_writes_epoch_log_embeddings_tensorboard_and_report(tmp_path, report_html_checker, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--loss",
                "proxy_anchor",
                "--lr-step",
                "1",
                "--lr-gamma",
                "0.5",
                "--tensorboard",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    assert "report: " in capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    lines = read_metrics_jsonl(out)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[-1]["loss"] == pytest.approx(record["final_epoch_loss"])
    # the rate each epoch ran at (before that epoch's step decay)
    assert [r["lr"]["trunk"] for r in lines] == pytest.approx([1e-3, 5e-4])
    assert sum(r["seconds"] for r in lines) == pytest.approx(record["train_seconds"], rel=1e-6)

    data = load_test_artifacts(out)
    assert data["embeddings"].shape == (896, 64) and data["labels"].shape == (896,)
    assert data["class_names"].tolist() == ["5", "6", "7", "8", "9"]
    assert data["thumbnails"].shape == (896, 12, 12) and data["thumbnails"].dtype == np.uint8
    assert data["thumbnails"].max() == 255  # digits scaled to the full range
    res = search(data["embeddings"], data["labels"], distance=data["retrieval_distance"])
    assert res.hits[:, 0].mean() == pytest.approx(record["metrics"]["recall_at_1"], abs=1e-9)
    # neighbours whose similarities agree to float32 rounding (every query of this barely trained
    # model has some within 1e-7) may be ordered differently by FAISS and by torch.topk: AP@R
    # can move in its 5th decimal (R@1 did not)
    assert np.nanmean(res.ap_at_r) == pytest.approx(record["metrics"]["map_at_r"], abs=1e-4)

    tags = report_html_checker((out / "report.html").read_text(encoding="utf-8"))
    assert [a.get("id") for t, a in tags if t == "section"] == list(RUN_SECTIONS)

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in lines])
    assert acc.Scalars("test/map_at_r")[-1].value == pytest.approx(record["metrics"]["map_at_r"])
    assert (out / "tensorboard" / "projector_config.pbtxt").is_file()


def test_no_report_and_compare_report(tmp_path, report_html_checker):
    assert main(["train", "--loss", "contrastive", "--out", str(tmp_path / "r"), "--no-report", *TINY]) == 0
    assert (tmp_path / "r" / "metrics.jsonl").is_file() and not (tmp_path / "r" / "report.html").exists()

    out = tmp_path / "cmp"
    assert (
        main(["compare", "--losses", "proxy_anchor,contrastive", "--out", str(out), "--embedding-size", "16", *TINY])
        == 0
    )
    tags = report_html_checker((out / "report.html").read_text(encoding="utf-8"))
    assert [a.get("id") for t, a in tags if t == "section"] == list(COMPARE_SECTIONS)
    links = sorted({a["href"] for t, a in tags if t == "a" and not a["href"].startswith("#")})
    # one report per loss (its first seed); every other seed links to its metrics.json
    reports = [link for link in links if link.endswith("report.html")]
    assert reports == [f"runs/{run}/seed0/report.html" for run in ("contrastive", "proxy_anchor", "untrained")]
    seeds = sorted({p.parent.name for p in out.glob("runs/*/seed*/metrics.json")})
    assert len(seeds) > 1 and sorted(set(links) - set(reports)) == [
        f"runs/{run}/{seed}/metrics.json" for run in ("contrastive", "proxy_anchor", "untrained") for seed in seeds[1:]
    ]
    assert not (out / "runs" / "proxy_anchor" / seeds[1] / "report.html").exists()
    for link in reports:
        report_html_checker((out / link).read_text(encoding="utf-8"))
    assert not (out / "runs" / "untrained" / "seed0" / "metrics.jsonl").exists()  # the floor does not train
    # compare validates on held-out training classes every epoch: metrics.jsonl carries those numbers
    run = out / "runs" / "proxy_anchor" / "seed0"
    history = json.loads((run / "metrics.json").read_text())["val_history"]
    lines = read_metrics_jsonl(run)
    assert history and [r["epoch"] for r in lines] == [h["epoch"] for h in history]
    assert [r["val_map_at_r"] for r in lines] == pytest.approx([h["val_map_at_r"] for h in history])
    assert all("val_recall_at_1" in r for r in lines)

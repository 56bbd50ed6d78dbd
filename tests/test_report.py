"""The HTML report without a browser: sections, images, no network, numbers against PML;
the run-folder writers; TensorBoard events read back; the ``report`` command."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pml_plugins.cli import main
from pml_plugins.pipeline.evaluate import make_accuracy_calculator, standard_metric_name
from pml_plugins.report import (
    append_metrics_line,
    load_test_artifacts,
    read_metrics_jsonl,
    save_test_artifacts,
    write_report,
    write_tensorboard,
)
from pml_plugins.report.compare_report import COMPARE_SECTIONS
from pml_plugins.report.retrieval import per_class, search
from pml_plugins.report.run_report import RUN_SECTIONS

torch.set_num_threads(1)


@pytest.fixture
def check_self_contained(report_html_checker):
    return report_html_checker


def test_run_report_sections_images_offline(report_run, check_self_contained):
    out, info = report_run
    text = (out / "report.html").read_text(encoding="utf-8")
    tags = check_self_contained(text)
    ids = [a.get("id") for t, a in tags if t == "section"]
    assert ids == list(RUN_SECTIONS)
    assert "Content-Security-Policy" in text
    # gallery: 8 sampled + 8 worst queries, 8 neighbours each, each right/wrong by sign AND border class
    thumbs = [a for t, a in tags if t == "img" and a.get("class") == "thumb"]
    assert len(thumbs) == 16 * 9
    ok, bad = text.count('<div class="cell ok">'), text.count('<div class="cell bad">')
    assert ok + bad == 16 * 8 and ok > 0 and bad > 0
    assert text.count('<span class="mark">✓</span>') == ok and text.count('<span class="mark">✗</span>') == bad
    # the map names every (unseen) class; the per-class table lists them all, worst first
    assert "t-SNE of 896 test embeddings" in text or "UMAP of 896" in text
    table = text[text.index('<table class="perclass">') :]
    rows = re.findall(r"<tr><td>(\d)</td><td>(\d+)</td><td>([\d.]+)</td><td>([\d.]+)</td>", table)
    assert sorted(r[0] for r in rows) == info["class_names"]
    maps = [float(r[3]) for r in rows]
    assert maps == sorted(maps)
    # the summary over all queries equals PML's metrics of the same embeddings
    m = re.search(r"Over these queries R@1 ([\d.]+), MAP@R ([\d.]+)", text)
    assert float(m.group(1)) == pytest.approx(100 * info["metrics"]["recall_at_1"], abs=0.051)
    assert float(m.group(2)) == pytest.approx(100 * info["metrics"]["map_at_r"], abs=0.051)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_search_matches_pml_metrics(distance):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=300)
    emb = (rng.normal(size=(6, 8))[labels] + 1.3 * rng.normal(size=(300, 8))).astype(np.float32)
    res = search(emb, labels, distance=distance, k=4)
    q = torch.as_tensor(emb)
    if distance == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
    pml = {
        standard_metric_name(k): v
        for k, v in make_accuracy_calculator((1,), distance).get_accuracy(q, torch.as_tensor(labels)).items()
    }
    assert res.hits[:, 0].mean() == pytest.approx(pml["recall_at_1"], abs=1e-9)
    assert np.nanmean(res.ap_at_r) == pytest.approx(pml["map_at_r"], abs=1e-6)


def test_per_class_against_brute_force():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), [5, 6, 7, 8])
    emb = rng.normal(size=(len(labels), 3))
    res = search(emb, labels, distance="euclidean", k=3)
    rows = {r["label"]: r for r in per_class(res, labels)}
    d = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    for c in range(4):
        members = np.flatnonzero(labels == c)
        r1 = np.mean([labels[order[i, 0]] == c for i in members])
        aps, wrong = [], []
        for i in members:
            R = len(members) - 1
            near = labels[order[i, :R]]
            hits = near == c
            aps.append(sum(hits[: j + 1].sum() / (j + 1) for j in range(R) if hits[j]) / R)
            wrong += near[~hits].tolist()
        assert rows[c]["recall_at_1"] == pytest.approx(r1)
        assert rows[c]["map_at_r"] == pytest.approx(np.mean(aps))
        _top, count = max(((o, wrong.count(o)) for o in set(wrong)), key=lambda t: (t[1], -t[0]))
        assert rows[c]["confused_with"][0][1] == pytest.approx(count / len(wrong))
        assert wrong.count(rows[c]["confused_with"][0][0]) == count


def test_metrics_jsonl_append_and_read(tmp_path):
    append_metrics_line(tmp_path, {"epoch": 1, "loss": np.float32(0.5), "lr": {"trunk": 1e-3}, "val_r1": float("nan")})
    append_metrics_line(tmp_path, {"epoch": 2, "loss": torch.tensor(0.25), "seconds": 1.5})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "lo')  # an interrupted write
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"epoch": 1, "loss": 0.5, "lr": {"trunk": 0.001}, "val_r1": None}
    assert read_metrics_jsonl(tmp_path) == [json.loads(lines[0]), {"epoch": 2, "loss": 0.25, "seconds": 1.5}]
    assert read_metrics_jsonl(tmp_path / "missing") == []
    with pytest.raises(TypeError, match="record"):
        append_metrics_line(tmp_path, [1, 2])


def test_save_test_artifacts_round_trip_and_errors(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    thumbs = np.zeros((2, 8, 8), np.uint8)
    save_test_artifacts(
        tmp_path,
        torch.as_tensor(emb),
        np.array([[0], [1], [1], [0]]),
        thumbs,
        thumbnail_index=[3, 1],
        class_names=["a", "b"],
        retrieval_distance="euclidean",
    )
    data = load_test_artifacts(tmp_path)
    assert np.array_equal(data["embeddings"], emb) and data["labels"].tolist() == [0, 1, 1, 0]
    assert data["thumbnail_index"].tolist() == [3, 1] and data["class_names"].tolist() == ["a", "b"]
    assert data["retrieval_distance"] == "euclidean"
    with pytest.raises(ValueError, match=r"embeddings must be \(N, D\)"):
        save_test_artifacts(tmp_path, emb, [0, 1])
    with pytest.raises(ValueError, match="thumbnails must be uint8"):
        save_test_artifacts(tmp_path, emb, [0, 1, 1, 0], thumbs.astype(np.float32))
    with pytest.raises(ValueError, match="thumbnail_index"):
        save_test_artifacts(tmp_path, emb, [0, 1, 1, 0], thumbs, thumbnail_index=[0, 9])
    with pytest.raises(ValueError, match="at most 32 px"):
        save_test_artifacts(tmp_path, emb, [0, 1, 1, 0], np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="class_names"):
        save_test_artifacts(tmp_path, emb, [0, 1, 2, 0], class_names=["a", "b"])


def test_feature_data_gallery_shows_labels_and_scores(tmp_path, check_self_contained):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    save_test_artifacts(
        tmp_path, rng.normal(size=(100, 6)) + labels[:, None], labels, class_names=[f"class{c}" for c in range(5)]
    )
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "features", "metrics": {"recall_at_1": 0.5}}))
    text = write_report(tmp_path).read_text()
    check_self_contained(text)
    assert 'class="thumb"' not in text
    assert text.count('class="box oktext"') + text.count('class="box badtext"') == 16 * 8
    assert re.search(r"class\d<br>cos -?\d\.\d{3}", text)


def test_compare_report_links_intervals_and_run_reports(tmp_path, report_run_builder, check_self_contained):
    cmp = tmp_path / "cmp"
    info = {d: report_run_builder(cmp / "runs" / f"pca{d}", dims=d) for d in (4, 16)}
    keys = ["recall_at_1", "map_at_r"]
    with open(cmp / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        header = ["loss", "status", *keys, *[f"{k}_ci95" for k in keys], "seeds", "val_map_at_r", "seconds_per_epoch"]
        w.writerow([*header, "error"])
        for i in info.values():
            w.writerow([i["name"], "ok", *[i["metrics"][k] for k in keys], 0.012, 0.034, 3, 0.5, 0.1, ""])
        w.writerow(["broken", "error", "", "", "", "", "", "", "", "ValueError: no"])
    (cmp / "runs" / "broken").mkdir()
    (cmp / "runs" / "broken" / "error.txt").write_text("Traceback ...\nValueError: no\n")
    (cmp / "results.json").write_text(json.dumps({"setting": {"dataset": "digits", "epochs": 3}}))
    code = main(["report", str(cmp), "--out", str(tmp_path / "elsewhere" / "c.html")])
    assert code == 0
    text = (tmp_path / "elsewhere" / "c.html").read_text()
    tags = check_self_contained(text)
    assert [a.get("id") for t, a in tags if t == "section"] == list(COMPARE_SECTIONS)
    assert f"{100 * info[16]['metrics']['recall_at_1']:.1f} ± 1.2" in text
    assert "<th>R@1</th><th>MAP@R</th><th>val MAP@R</th><th>seeds</th>" in text
    links = {a["href"] for t, a in tags if t == "a" and not a["href"].startswith("#")}
    assert links == {"../cmp/runs/pca4/report.html", "../cmp/runs/pca16/report.html", "../cmp/runs/broken/error.txt"}
    assert not (cmp / "runs" / "broken" / "report.html").exists()
    for link in links - {"../cmp/runs/broken/error.txt"}:
        run_text = (tmp_path / "elsewhere" / link).read_text()
        check_self_contained(run_text)


def test_report_command_and_errors(report_run, tmp_path, capsys):
    out, _ = report_run
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r.html").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_tensorboard_events_read_back(report_run, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, info = report_run
    logdir = write_tensorboard(out, tmp_path / "tb")
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("lr/trunk")] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    assert acc.Scalars("test/recall_at_1")[0].value == pytest.approx(info["metrics"]["recall_at_1"])
    assert "train/seconds" in tags
    # the projector: config, the embeddings, class names and a sprite of the thumbnails
    config = (logdir / "projector_config.pbtxt").read_text()
    tensor_path = re.search(r'tensor_path: "([^"]+)"', config).group(1)
    tensors = np.loadtxt(logdir / tensor_path, delimiter="\t")
    assert tensors == pytest.approx(info["embeddings"], abs=1e-4)
    meta = (logdir / re.search(r'metadata_path: "([^"]+)"', config).group(1)).read_text().split()
    assert meta == [info["class_names"][c] for c in info["labels"]]
    sprite = logdir / re.search(r'image_path: "([^"]+)"', config).group(1)
    with Image.open(sprite) as im:
        assert im.width >= 12 * 29  # ceil(sqrt(896)) thumbnails of 12 px a side


def test_image_file_thumbnails_and_rgb_projector(tmp_path):
    from pml_plugins.pipeline.data import RelabeledImages
    from pml_plugins.report import make_thumbnails

    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    paths = []
    for i, (colour, size) in enumerate(zip(colours, [(64, 40), (20, 30), (100, 100)])):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    thumbs = make_thumbnails(RelabeledImages([str(p) for p in paths], np.array([0, 1, 1])), [2, 0, 1])
    assert thumbs.shape == (3, 32, 32, 3) and thumbs.dtype == np.uint8
    assert [tuple(t[16, 16]) for t in thumbs] == [colours[2], colours[0], colours[1]]
    assert tuple(thumbs[1, 0, 16]) == (255, 255, 255)  # 64x40 -> 32x20, centred on a white square
    assert make_thumbnails(torch.utils.data.TensorDataset(torch.zeros(3, 4)), [0]) is None

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    run = tmp_path / "run"
    save_test_artifacts(
        run, np.eye(3, dtype=np.float32), [0, 1, 1], thumbs, thumbnail_index=[2, 0, 1], class_names=["red", "blue"]
    )
    logdir = write_tensorboard(run)
    config = (logdir / "projector_config.pbtxt").read_text()
    sprite = logdir / re.search(r'image_path: "([^"]+)"', config).group(1)
    meta = (logdir / re.search(r'metadata_path: "([^"]+)"', config).group(1)).read_text().split()
    assert meta == ["blue", "red", "blue"]  # rows 2, 0, 1: the rows that have a thumbnail, in their order
    with Image.open(sprite) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
        assert im.getpixel((16, 16)) == colours[2] and im.getpixel((48, 16)) == colours[0]


def test_search_bounds_queries_and_depth(monkeypatch):
    from pml_plugins.report import retrieval

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], [40, 10])
    emb = rng.normal(size=(50, 4))
    res = search(emb, labels, distance="cosine", k=3, max_queries=20, seed=5)
    assert len(res.queries) == 20 and np.all(np.diff(res.queries) > 0)
    assert res.queries.tolist() == search(emb, labels, k=3, max_queries=20, seed=5).queries.tolist()  # seeded
    monkeypatch.setattr(retrieval, "MAX_DEPTH", 6)  # class 0 has R = 39 > 6 neighbours kept
    res = search(emb, labels, distance="cosine", k=3)
    assert res.neighbours.shape == (50, 6)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    for q in (0, 45):
        hits = labels[np.argsort(-sim[q], kind="stable")[:6]] == labels[q]
        expected = sum(hits[: j + 1].sum() / (j + 1) for j in range(6) if hits[j]) / (np.sum(labels == labels[q]) - 1)
        assert res.ap_at_r[q] == pytest.approx(expected)


def test_tensorboard_flag_without_the_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    for command in (["train", "--loss", "contrastive"], ["compare", "--losses", "contrastive"]):
        assert main([*command, "--tensorboard", "--out", str(tmp_path / command[0]), "--no-progress"]) == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
        assert not (tmp_path / command[0]).exists()  # refused before any training

"""Pipelined predict: reading threads keep inputs ready ahead of the backend, records stay in input order,
and ``cxr-bench pipeline`` compares predict end to end with the backend alone."""

from __future__ import annotations

import json
import shutil

from tests.conftest import cli


def test_reading_threads_keep_input_order_and_answers(bundle, phantoms, tmp_path):
    from cxr.runtime.predict_job import PredictJob, run_predict

    films = sorted(phantoms.rglob("*.png"))[:40]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    inputs = [str(p) for p in films[:20]] + [str(tmp_path / "broken.png")] + [str(p) for p in films[20:]]
    records = {}
    for workers in (1, 3):
        out = tmp_path / f"r{workers}.jsonl"
        summary = run_predict(PredictJob(inputs=inputs, model=bundle, out=out, workers=workers, batch_size=8))
        records[workers] = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary.stages.images == 41 and summary.images_per_s > 0
        assert summary.stages.decode_s > 0 and summary.stages.infer_s > 0
    assert [r["path"] for r in records[3]] == inputs  # input order, whatever thread read each
    assert [r["probs"] for r in records[3]] == [r["probs"] for r in records[1]]
    assert records[3][20]["error"] and all(r["label"] for i, r in enumerate(records[3]) if i != 20)


def test_bench_pipeline_compares_predict_with_the_backend_alone(bundle, phantoms, tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    for path in sorted(phantoms.rglob("*.png"))[:24]:
        shutil.copy(path, folder / path.name)
    result = cli(
        "cxr-bench",
        "pipeline",
        "--model",
        str(bundle),
        str(folder),
        "--backend",
        "onnxruntime",
        "--workers",
        "1,2",
        "--batch-size",
        "8",
        "--rounds",
        "2",
        "--out",
        str(tmp_path / "out"),
    )
    report = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    rows = report["end_to_end"]
    assert report["backend_alone"]["images"] == 24
    assert [(r["workers"], r["round"]) for r in rows] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    alone = report["backend_alone"]["runs_images_per_s"]  # before, between and after the rounds
    assert len(alone) == 3 and abs(report["backend_alone"]["images_per_s"] - sum(alone) / 3) < 1e-9
    for row in rows:  # each run against the backend alone just before and after its round
        around = (alone[row["round"]] + alone[row["round"] + 1]) / 2
        assert abs(row["vs_backend"] - row["images_per_s"] / around) < 1e-9
    assert all(r["images"] == 24 and r["failed"] == 0 for r in rows)
    for summary in report["summary"]:
        ratios = sorted(r["vs_backend"] for r in rows if r["workers"] == summary["workers"])
        assert summary["rounds"] == 2 and abs(summary["median_vs_backend"] - sum(ratios) / 2) < 1e-9
        assert (summary["min_vs_backend"], summary["max_vs_backend"]) == (ratios[0], ratios[1])
    assert "| predict, 2 reading thread(s), round 2 |" in result.stdout
    assert "| reading threads | rounds | median vs backend | range |" in result.stdout

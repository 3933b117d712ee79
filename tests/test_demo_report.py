"""The demo's REPORT.md quality table carries precision/recall, and reads reports written before they existed."""
import json

from evar.apps.demo import DemoPlan, write_report


def test_quality_table_has_recall_and_reads_old_reports(tmp_path):
    (tmp_path / "quality").mkdir()
    new = {"class_accuracy": 1.0, "frechet_distance": 88.0, "real_data_floor": 26.0, "precision": 0.86, "recall": 0.7}
    old = {"class_accuracy": 0.9, "frechet_distance": 99.0, "real_data_floor": 26.0}  # no precision/recall yet
    (tmp_path / "quality" / "dense.json").write_text(json.dumps({"params": 1.3e6, "quality": new}))
    (tmp_path / "quality" / "pruned.json").write_text(json.dumps({"params": 0.8e6, "quality": old}))
    text = write_report(DemoPlan(model="builtin:digits", out=tmp_path, sparsity=0.4, method="obs"), {}, []).read_text()
    assert "| precision | recall |" in text
    assert "| dense | 1.30M | 100.0% | 88.0 (26.0) | 0.860 | 0.700 |" in text
    assert "| pruned | 0.80M | 90.0% | 99.0 (26.0) | – | – |" in text


def test_report_states_the_recipe_and_digits_distil_on_digits(tmp_path):
    from evar.apps.demo import distill_data

    text = write_report(DemoPlan(model="builtin:digits", out=tmp_path), {}, []).read_text()
    assert "40% of the blocks' weights with obs (25% of the heads, the rest FFN units)" in text
    assert "(on digits data)" in text
    assert distill_data("builtin:digits") == "digits" and distill_data("runs/d16") == "teacher"

"""A batch job's bookkeeping without Ray: planning, one row per input, duplicates dropped,
missing inputs named, refused inputs reported one by one."""

from __future__ import annotations

import numpy as np

from ufad.runtime.batch_rows import Ledger
from ufad.runtime.batch_score import concat, score_item
from ufad.runtime.batch_summary import Summary, format_summary
from ufad.runtime.sources import plan_items, source_files


def test_plan_score_and_ledger_keep_one_row_per_input(session, mnist, tmp_path):
    x = mnist["test"][0]
    np.save(tmp_path / "a.npy", x[:70])
    bad = x[70:100].copy()
    bad[3] *= 255                      # refused by the range rule, alone
    np.save(tmp_path / "b.npy", bad)
    np.save(tmp_path / "c.npy", x[0])  # one sample without a batch axis
    np.save(tmp_path / "d.npy", x[:9])
    (tmp_path / "d.npy").write_bytes((tmp_path / "d.npy").read_bytes()[:1000])  # cut short
    files = source_files([tmp_path], session.input_spec)
    assert [f.count for f in files] == [70, 30, 1, 0] and "truncated" in files[3].error and files[2].single
    items = plan_items(files, batch_size=32)
    assert all(sum(len(s) for s in it) <= 32 for it in items)
    assert sum(len(s) for it in items for s in it) == 101
    blocks = [score_item(session, files, it) for it in items]
    rows = concat(blocks, len(session.layer_names))
    assert len(rows["file_id"]) == 101
    err = rows["error"] != ""
    assert list(zip(rows["file_id"][err], rows["index"][err])) == [(1, 3)]
    assert "far outside the model's range" in rows["error"][err][0]
    ok_a = (rows["file_id"] == 0)
    local = session.run(x[:70])
    order = np.argsort(rows["index"][ok_a])
    np.testing.assert_array_equal(rows["pred"][ok_a][order], local.pred)
    np.testing.assert_array_equal(rows["is_anomaly"][ok_a][order], local.is_anomaly)

    ledger = Ledger(files)
    first = [ledger.admit(b) for b in blocks]
    assert sum(len(b["file_id"]) for b in first) == 101 and ledger.duplicates == 0
    again = ledger.admit(blocks[1])                     # a retried task's second answer
    assert len(again["file_id"]) == 0 and ledger.duplicates == len(blocks[1]["file_id"])
    assert ledger.missing() == [(files[3].path, 1)]     # the unreadable file's row is the driver's

    summary = Summary(session.classes, session.threshold)
    for b in blocks:
        summary.add(b, [f.path for f in files])
    d = summary.to_json(out="audit.jsonl")
    assert (d["inputs"], d["error_rows"], d["flagged"]) == (100, 1, int(rows["is_anomaly"][~err].sum()))
    text = format_summary(d)
    assert "100 inputs scored" in text and "1 error row from 1 source\n" in text
    assert f"error: {files[1].path} (1 row): input 3: input values span" in text
    clean = Summary(session.classes, session.threshold)
    clean.add(blocks[0] if not (blocks[0]["error"] != "").any() else blocks[-1], [f.path for f in files])
    assert "no error rows" in format_summary(clean.to_json(out="x"))

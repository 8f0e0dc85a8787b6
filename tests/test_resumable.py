"""The one resumable-output mechanism: work folders, torn JSONL lines, and fixed-size rows read back.

    python -m pytest -q tests/test_resumable.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from python3_distillation.errors import DataError
from python3_distillation.fsio import read_rows
from python3_distillation.resumable import MANIFEST, PROGRESS, WorkFolder, append_jsonl, jsonl_rows


def test_a_work_folder_resumes_only_what_it_accepts_and_publishes_whole(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    work = WorkFolder(dest)
    assert work.path == tmp_path / ".out.partial"
    assert work.resume(lambda record: True) is None and list(work.path.iterdir()) == []  # nothing to resume
    (work.path / "part").write_bytes(b"12")
    work.commit({"key": "a", "done": 1}, sync=[work.path / "part"])
    assert WorkFolder(dest).resume(lambda record: record["key"] == "a") == {"key": "a", "done": 1}
    assert (work.path / "part").read_bytes() == b"12"  # accepted: the work is kept
    assert WorkFolder(dest).resume(lambda record: record["key"] == "b") is None
    assert list(work.path.iterdir()) == []  # refused: started afresh, empty
    (work.path / "part").write_bytes(b"34")
    work.commit({"key": "b"})
    work.publish({"key": "b", "name": "é"})
    assert not work.path.exists() and sorted(p.name for p in dest.iterdir()) == [MANIFEST, "part"]
    assert json.loads((dest / MANIFEST).read_text(encoding="utf-8")) == {"key": "b", "name": "é"}
    assert not (dest / PROGRESS).exists() and (dest / "part").read_bytes() == b"34"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder was replaced, not kept aside


def test_jsonl_rows_cut_a_torn_last_line_and_refuse_a_foreign_file(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    assert jsonl_rows(path) == []
    append_jsonl(path, [{"step": 1, "text": "Café"}, {"step": 2}], sync=True)
    whole = path.read_bytes()
    assert whole == '{"step": 1, "text": "Café"}\n{"step": 2}\n'.encode()
    with path.open("ab") as f:
        f.write(b'{"step": 3, "lo')  # what a kill in the middle of a write leaves
    assert jsonl_rows(path) == [{"step": 1, "text": "Café"}, {"step": 2}]
    assert path.read_bytes() == whole and "dropping a line cut off" in caplog.text
    path.write_bytes(whole + b"not json\n" + whole)
    with pytest.raises(DataError, match=r"log.jsonl:3: not a JSON line"):
        jsonl_rows(path)
    path.write_bytes(b"[1, 2]\n")  # JSON, but not an object
    with pytest.raises(DataError, match=r"log.jsonl:1: not a JSON line"):
        jsonl_rows(path)


@pytest.mark.parametrize("rows", [[3, 4, 5], [5, 0, 5, 2], [], [6]])
def test_read_rows_reads_exactly_the_rows_asked_for(tmp_path, rows):
    table = np.arange(7 * 3 * 2, dtype=np.float16).reshape(7, 3, 2)
    path = tmp_path / "rows.bin"
    table.tofile(path)
    got = read_rows(path, np.array(rows, dtype=np.int64), np.empty((len(rows), 3, 2), dtype=np.float16))
    assert np.array_equal(got, table[rows])
    with pytest.raises(DataError, match="shorter than"):
        read_rows(path, np.array([6, 7]), np.empty((2, 3, 2), dtype=np.float16))  # row 7 is past the end

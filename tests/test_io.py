"""bench.io: atomic writes, strict JSON, locked appends of results rows, refusal of foreign files, paths."""
from __future__ import annotations

import csv
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from bench import io
from bench.errors import BenchError


@dataclass
class Row:
    model: Optional[str] = None
    value: Optional[float] = None
    note: Optional[str] = None


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    io.write_text(path, "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(path, broken)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_json_is_strict(tmp_path):
    path = io.write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.5, math.inf], "c": (1, 2), "d": Path("p")})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert io.read_json(path) == {"a": None, "b": [1.5, None], "c": [1, 2], "d": "p"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BenchError, match="bad.json is not a readable"):
        io.read_json(tmp_path / "bad.json")


def test_rows_are_appended_under_one_header_with_full_precision(tmp_path):
    results = io.ResultsFile(tmp_path / "r.csv", Row)
    results.append([{"model": "a", "value": 0.1 + 0.2}])
    results.append([Row(model="b", value=math.nan, note="x,y")])
    rows = read(tmp_path / "r.csv")
    assert [r["model"] for r in rows] == ["a", "b"]
    assert float(rows[0]["value"]) == 0.1 + 0.2 and rows[1]["value"] == "" and rows[1]["note"] == "x,y"
    assert (tmp_path / "r.csv").read_text().count("model,value,note") == 1
    with pytest.raises(ValueError, match="no column 'other'"):
        results.append([{"other": 1}])


@pytest.mark.parametrize("content", [b"model,secret\nold,1\n", b"\x00\x01\xff garbage", b"just some text\n"])
def test_a_file_that_is_not_ours_is_refused_and_never_touched(tmp_path, content):
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    results = io.ResultsFile(path, Row)
    for call in (results.check, lambda: results.append([{"model": "a"}]), results.read):
        with pytest.raises(BenchError, match="not a sis-bench Row file"):
            call()
    assert path.read_bytes() == content


def test_a_file_of_an_older_schema_is_migrated_keeping_its_rows(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("model,value\nold,1.5\n")
    io.ResultsFile(path, Row).append([{"model": "new", "note": "n"}])
    rows = read(path)
    assert rows == [{"model": "old", "value": "1.5", "note": ""}, {"model": "new", "value": "", "note": "n"}]


def _append_many(args):
    path, worker = args
    results = io.ResultsFile(path, Row)
    for i in range(12):
        results.append([{"model": f"w{worker}-{i}", "value": float(i)}])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "r.csv"
    io.ResultsFile(path, Row).append([{"model": f"old-{i}"} for i in range(5)])
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_append_many, [(path, w) for w in range(3)])
    models = [r["model"] for r in read(path)]
    expected = [f"old-{i}" for i in range(5)] + [f"w{w}-{i}" for w in range(3) for i in range(12)]
    assert sorted(models) == sorted(expected) and models[:5] == expected[:5]


def test_paths_are_recorded_without_the_machine_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.display_path(tmp_path / "a" / "b") == "a/b"
    assert io.tidy(f"see {tmp_path}/a/b.png") == "see a/b.png"
    assert io.contained("a/b", tmp_path, "x") == tmp_path / "a" / "b"
    with pytest.raises(BenchError, match="outside"):
        io.contained("../elsewhere", tmp_path / "a", "samples.json")
    with pytest.raises(BenchError, match="outside"):
        io.contained("/etc/passwd", tmp_path, "samples.json")

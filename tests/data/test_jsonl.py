"""The shared JSON Lines reader and writers: strict lines, a killed writer's cut-short tail,
atomic rewrites and group resumption."""

import json

import pytest

from lmm_align.data import jsonl


def test_strict_reader_names_file_and_line(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2}\n')
  assert jsonl.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  assert [n for n, _ in jsonl.numbered_records(path)] == [1, 3]
  path.write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"r.jsonl: line 2: not a JSON object"):
    jsonl.read_jsonl(path)
  path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
  with pytest.raises(ValueError, match=r"r.jsonl: line 2: not valid JSON"):
    jsonl.read_jsonl(path, tolerate_cut_tail=True)  # not the last line: never tolerated


def test_cut_short_last_line_is_dropped_with_a_warning_only_when_tolerated(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_text('{"a": 1}\n{"a": 2')
  with pytest.raises(ValueError, match=r"out.jsonl: line 2: not valid JSON"):
    jsonl.read_jsonl(path)
  with pytest.warns(UserWarning, match=r"out.jsonl: line 2: dropped a truncated last line"):
    assert jsonl.read_jsonl(path, tolerate_cut_tail=True) == [{"a": 1}]


def test_bad_lines_are_skipped_and_numbered_when_asked(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"a": 1}\n[1]\n{"a": \n{"a": 4}\n"x"\n{"a": 6')
  bad = []
  with pytest.warns(UserWarning, match=r"line 6: dropped a truncated last line"):
    got = list(jsonl.numbered_records(path, tolerate_cut_tail=True, bad_lines=bad))
  assert got == [(1, {"a": 1}), (4, {"a": 4})]
  assert bad == [2, 3, 5]
  bad = []
  assert [n for n, _ in jsonl.numbered_records(path, bad_lines=bad)] == [1, 4]
  assert bad == [2, 3, 5, 6]  # a cut tail that is not tolerated is a bad line like the others


def test_write_jsonl_replaces_the_file_whole(tmp_path):
  path = tmp_path / "w.jsonl"
  jsonl.write_jsonl(path, [{"t": "é"}, {"t": 2}])
  assert path.read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
  jsonl.write_jsonl(path, [{"t": 3}])
  assert jsonl.read_jsonl(path) == [{"t": 3}]
  assert not (tmp_path / "w.jsonl.tmp").exists()


def test_resume_keeps_complete_groups_and_rewrites_the_file(tmp_path):
  path = tmp_path / "g.jsonl"
  assert jsonl.resume_jsonl(path, "g", lambda *_: True) == {}
  with open(path, "w") as f:
    jsonl.append_jsonl(f, [{"g": "x", "i": 0}, {"g": "x", "i": 1}])
    jsonl.append_jsonl(f, [{"g": "y", "i": 0}])
    f.write('{"g": "y", "i"')  # a kill mid-write
  with pytest.warns(UserWarning, match="truncated last line"):
    done = jsonl.resume_jsonl(path, "g", lambda group, records, where: len(records) == 2)
  assert done == {"x": [{"g": "x", "i": 0}, {"g": "x", "i": 1}]}
  assert [json.loads(line) for line in path.read_text().splitlines()] == done["x"]
  path.write_text('{"i": 0}\n')
  with pytest.raises(ValueError, match=r"g.jsonl: line 1: field 'g' missing"):
    jsonl.resume_jsonl(path, "g", lambda *_: True)

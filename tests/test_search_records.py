"""Reading a corpus for indexing: ids, texts, metadata, and every kind of bad row reported by line number."""
from __future__ import annotations

import pytest

from allmpnet import textfiles
from allmpnet.search import CorpusSpec, iter_records, scan


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def read_all(path, spec=CorpusSpec(), skip_bad=False, existing=frozenset()):
    report = scan(path, spec, existing, skip_bad=skip_bad)
    return report, list(iter_records(path, report, spec))


def test_jsonl_ids_joined_text_fields_and_metadata(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"_id": "4983", "title": "A title.", "text": "Body ", "year": 2001}\n'
                                       b'{"_id": 7, "title": "", "text": "Only body", "tags": ["x"]}\n')
    report, rows = read_all(path, CorpusSpec(text_fields=("title", "text")))
    assert report.id_field == "_id" and report.rows == 2
    assert [(r.id, r.text, r.metadata, r.line) for r in rows] == [
        ("4983", "A title. Body", {"year": 2001}, 1), ("7", "Only body", {"tags": ["x"]}, 2)]


def test_txt_rows_use_line_numbers_and_count_blank_lines(tmp_path):
    path = write(tmp_path / "c.txt", b"first\n\n  \nsecond\r\nthird")
    report, rows = read_all(path)
    assert [(r.id, r.text) for r in rows] == [("1", "first"), ("4", "second"), ("5", "third")]
    assert report.blank == 2 and "2 blank line(s) skipped" in report.summary()


def test_csv_columns_metadata_and_bad_column_count(tmp_path):
    path = write(tmp_path / "c.csv", b'id,text,lang\n1,"hello, world",en\n2,"multi\nline",fr\n3,short\n4,ok,de\n')
    with pytest.raises(ValueError, match=r"line 5: 2 columns, header has 3"):
        scan(path)
    report, rows = read_all(path, skip_bad=True)
    assert [(r.id, r.text, r.metadata, r.line) for r in rows] == [
        ("1", "hello, world", {"lang": "en"}, 2), ("2", "multi\nline", {"lang": "fr"}, 4), ("4", "ok", {"lang": "de"}, 6)]
    assert report.bad == [(5, "2 columns, header has 3")]


BAD_JSONL = (b'{"id": "a", "text": "good"}\n'
             b'{"id": "a", "text": "same id again"}\n'      # 2 duplicate
             b'\xff\xfe broken bytes\n'                     # 3 not UTF-8
             b'[1, 2]\n'                                    # 4 not an object
             b'{"id": "b", "text": 42}\n'                   # 5 text not a string
             b'{"id": {"x": 1}, "text": "t"}\n'             # 6 id not str/int
             b'{"text": "no id"}\n'                         # 7 id missing
             b'{"id": "c", "text": "   "}\n'                # 8 empty text
             b'{not json\n'                                 # 9
             b'\n'                                          # 10 empty line
             b'{"id": "d", "text": "fine"}\n')


def test_every_bad_row_is_named_or_counted(tmp_path):
    path = write(tmp_path / "bad.jsonl", BAD_JSONL)
    with pytest.raises(ValueError) as err:
        scan(path)
    message = str(err.value)
    assert "9 bad row(s)" in message and "line 2: duplicate id 'a'" in message and "--skip-bad" in message
    report, rows = read_all(path, skip_bad=True)
    assert [r.id for r in rows] == ["a", "d"]
    reasons = dict(report.bad)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "not valid UTF-8" in reasons[3] and "got list" in reasons[4] and "is int" in reasons[5]
    assert "is dict" in reasons[6] and "missing" in reasons[7] and reasons[8] == "empty text"
    assert reasons[9].startswith("not JSON") and reasons[10] == "empty line"


def test_ids_already_in_the_index_are_bad_rows(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"id": "old", "text": "x"}\n{"id": "new", "text": "y"}\n')
    report, rows = read_all(path, skip_bad=True, existing={"old"})
    assert [r.id for r in rows] == ["new"] and "already in the index" in report.bad[0][1]


def test_huge_lines_and_texts_are_refused_without_reading_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "MAX_LINE_BYTES", 1000)
    path = write(tmp_path / "c.txt", b"short\n" + b"x" * 5000 + b"\n" + b"y" * 600 + b"\nlast\n")
    report, rows = read_all(path, CorpusSpec(max_chars=500), skip_bad=True)
    assert [r.text for r in rows] == ["short", "last"]
    assert report.bad[0] == (2, "line longer than 1000 bytes")
    assert report.bad[1][0] == 3 and "600 characters is over the limit of 500" in report.bad[1][1]


def test_empty_and_missing_corpus(tmp_path):
    with pytest.raises(ValueError, match="no rows to index"):
        scan(write(tmp_path / "empty.jsonl", b""))
    with pytest.raises(ValueError, match="no rows to index"):
        scan(write(tmp_path / "blank.txt", b"\n\n"))
    with pytest.raises(ValueError, match="no rows to index"):
        scan(write(tmp_path / "header.csv", b"id,text\n"))
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "nope.txt")

"""`kill -9` during an index's first build: `index info` says what to do, and a re-run or --overwrite works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from allmpnet.cli import main
from allmpnet.search import Index, IndexFormatError
from conftest import kill_9_while_writing

FIRST_BUILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from pathlib import Path
    from allmpnet.search import open_writer, storage
    root, phase = Path(sys.argv[1]), sys.argv[2]

    def stop(where):
        print(where, flush=True)
        time.sleep(600)  # the test kills us here

    if phase == "pointer-written":  # CURRENT.tmp written and synced, not yet renamed onto CURRENT
        storage.os.replace = lambda a, b: stop(phase)
    if phase == "renamed":  # the version folder is in place, CURRENT.tmp not yet written
        real_fsync = storage.fsync_path
        storage.fsync_path = lambda p: stop(phase) if p == root else real_fsync(p)
    with open_writer(root, dim=8) as w:
        w.append([str(i) for i in range(50)], ["t"] * 50, [{}] * 50,
                 np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
        if phase == "appending":
            stop(phase)
""")


def kill_first_build(root: Path, phase: str, tmp_path: Path) -> list[str]:
    script = tmp_path / "first_build.py"
    script.write_text(FIRST_BUILD)
    proc = subprocess.Popen([sys.executable, str(script), str(root), phase], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == phase
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("phase, left", [
    ("appending", lambda names: any(n.startswith(".staging-") for n in names)),
    ("renamed", lambda names: "v000001" in names and "CURRENT.tmp" not in names),
    ("pointer-written", lambda names: {"v000001", "CURRENT.tmp"} <= set(names)),
])
@pytest.mark.parametrize("how", ["rerun", "overwrite"])
def test_killed_first_build_can_be_run_again(tmp_path, capsys, phase, left, how):
    root = tmp_path / "ix"
    names = kill_first_build(root, phase, tmp_path)
    assert left(names) and "CURRENT" not in names, names
    with pytest.raises(IndexFormatError, match="first build was interrupted"):
        Index.open(root)
    assert main(["index", "info", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"allmpnet index build CORPUS --out {root}" in err and "interrupted" in err
    vectors = np.eye(4, dtype=np.float32)
    index = Index.build(root, vectors=vectors, overwrite=how == "overwrite")
    assert len(index) == 4 and index.version.name == "v000001"
    assert sorted(p.name for p in root.iterdir()) == [".lock", "CURRENT", "v000001"]  # the debris is gone


def test_a_folder_with_foreign_files_is_still_refused(tmp_path):
    root = tmp_path / "ix"
    kill_first_build(root, "pointer-written", tmp_path)
    (root / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(IndexFormatError, match="is not an allmpnet index"):
            Index.build(root, vectors=np.eye(3, dtype=np.float32), overwrite=overwrite)
    assert (root / "notes.txt").read_text() == "mine"


def test_kill_9_during_the_first_cli_build_then_build_again(tmp_path, tiny_model_dir, capsys):
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(f"the sun and the moon {i}\n" for i in range(5000)))
    root = tmp_path / "ix"
    cli = [str(Path(sys.executable).with_name("allmpnet")), "index", "build", str(corpus), "--out", str(root),
           "--model", str(tiny_model_dir), "--device", "cpu"]
    kill_9_while_writing(cli, root)
    assert main(["index", "info", str(root)]) == 2
    assert "allmpnet index build CORPUS --out" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("a cat\nthe dog\n")
    done = subprocess.run(cli[:3] + [str(small)] + cli[4:], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(Index.open(root)) == 2

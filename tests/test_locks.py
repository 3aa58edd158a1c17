"""One writer per workdir (io/lock.py) and outputs that are whole or absent (io/workdir.py's
checks, the atomic writers): a second launch on a busy workdir refuses with one line and
changes nothing; a stale lock is taken over with a warning; a damaged output of an older run
makes `--mode=all` run its stage again, with a warning naming the file.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from helpers import ROOT, run_launch

from gencnp_jax.io import lock as lock_lib
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers
from gencnp_jax.stages import modes, pipeline

HOLD = (
    "import sys, time; from gencnp_jax.io.lock import WorkdirLock; "
    "WorkdirLock(sys.argv[1], '--mode=all').acquire(); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of `tmp_path / "run"`: `(workdir, process)`."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, workdir],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield workdir, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_launch_refuses_and_changes_nothing(tiny_config, holder):
    workdir, proc = holder
    before = sorted(os.listdir(workdir))
    result = run_launch(tiny_config, workdir, "train_classifier", timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    print(last)
    assert last.startswith(
        f"error: workdir {workdir} is in use by process {proc.pid} on host "
        f"{socket.gethostname()} since "
    ), last
    assert last.endswith(
        f"(--mode=all): wait for it to end, or use another --workdir (if that process is gone, "
        f"delete {os.path.join(workdir, '.lock')})"
    ), last
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(workdir)) == before  # no config.json, no stage folder


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_config, holder, caplog):
    workdir, proc = holder
    proc.kill()
    proc.wait()
    with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
        with pytest.raises(SystemExit) as info:
            pipeline.run("report", tiny_config, workdir)  # gets the lock, then: no classifier
    assert info.value.code == 1
    assert f"taking over the stale lock {os.path.join(workdir, '.lock')} of process {proc.pid}" in (
        caplog.text
    )
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end


def test_lock_release_keeps_another_holders_lock(tmp_path):
    lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    with open(lock.path, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere"}, f)  # taken over meanwhile by another host
    lock.release()
    assert os.path.exists(lock.path)
    with pytest.raises(lock_lib.WorkdirBusy, match="in use by process 1 on host elsewhere"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()


# --- whole outputs --------------------------------------------------------------------------


def _complete_outputs(workdir: str) -> None:
    """Outputs of every pipeline stage that parse (fake stages' results)."""
    for mode in modes.PIPELINE:
        for rel in workdir_lib.OUTPUTS[mode]:
            path = os.path.join(workdir, rel)
            if rel.endswith("/"):
                os.makedirs(os.path.join(path, "1"), exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("<html></html>" if rel.endswith(".html") else '{"a": [1, 2, 3]}')


@pytest.mark.parametrize(
    "mode, rel, damage",
    [
        ("evaluate", "eval/results.json", "truncate"),
        ("build_bank", "bank/bank.json", "empty"),
        ("report", "report/index.html", "truncate"),
        ("report", "report/fig.png", "truncate"),
    ],
)
def test_a_damaged_output_reruns_its_stage(mode, rel, damage, tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path)
    _complete_outputs(workdir)
    index = os.path.join(workdir, "report", "index.html")
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64 + b"IEND\xaeB`\x82"
    with open(os.path.join(workdir, "report", "fig.png"), "wb") as f:
        f.write(png)
    with open(index, "w") as f:
        f.write('<html><img src="fig.png" alt="x"></html>\n')
    assert all(workdir_lib.is_done(m, workdir) for m in modes.PIPELINE)
    path = os.path.join(workdir, rel)
    with open(path, "r+b") as f:  # cut in half by hand (or emptied)
        f.truncate(0 if damage == "empty" else os.path.getsize(path) // 2)
    calls = []
    monkeypatch.setattr(modes, "stage_fn", lambda m: lambda config, wd: calls.append(m))
    pipeline.run_all({}, workdir)
    assert calls[0] == mode, calls
    err = capsys.readouterr().err
    print(err)
    assert f"warning: [{mode}] {path} " in err and f": running {mode} again" in err, err


def test_output_checks_name_what_is_wrong(tmp_path):
    check = workdir_lib.output_problem
    assert check(str(tmp_path / "absent.json")) == "is missing"
    (tmp_path / "a.json").write_text('{"x": ')
    assert check(str(tmp_path / "a.json")).startswith("does not parse (JSONDecodeError")
    (tmp_path / "a.npz").write_bytes(b"PK\x03\x04 half")
    assert check(str(tmp_path / "a.npz")).startswith("does not parse (BadZipFile")
    (tmp_path / "ckpt").mkdir()
    assert check(str(tmp_path / "ckpt") + "/") == "holds no saved step"


def test_atomic_writer_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "out.json")
    writers.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        writers.write_json(path, {"a": object()})  # fails half-way through json.dump
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind

"""Tests of the stage pipeline (pipeline.py): `run_all` runs every stage once, in order.

On the tiny config and synthetic data, then again: the second run must find every stage
complete (its DONE file present) and call none of them. The training stages start from the
session's trained run (conftest); tests/test_notebook.py runs all five from scratch.
"""

import json
import os
import shutil

import ml_collections
import pytest

from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.stages import modes, pipeline


def _no_stage(mode):
    raise AssertionError(f"stage {mode!r} was run although it is complete")


@pytest.mark.slow  # the evaluation stage: 40-90 s on two busy CPU cores
def test_run_all_then_skip(tiny_config, generator_workdir, tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(
        generator_workdir,
        workdir,
        ignore=shutil.ignore_patterns(
            *(os.path.dirname(workdir_lib.DONE_FILES[m]) for m in modes.PIPELINE[2:])
        ),
    )
    timings = pipeline.run_all(tiny_config, workdir)
    out = capsys.readouterr().out
    assert list(timings) == list(modes.PIPELINE)
    assert timings["train_classifier"] == timings["train_generator"] == "skipped"
    for mode in modes.PIPELINE:
        assert workdir_lib.is_done(mode, workdir), mode
    for mode in modes.PIPELINE[2:]:
        assert isinstance(timings[mode], float), (mode, timings[mode])
        assert f"[{mode}] done in" in out
    report = os.path.join(workdir, "report", "index.html")
    assert f"Report: {report}" in out

    monkeypatch.setattr(modes, "stage_fn", _no_stage)
    timings = pipeline.run_all(tiny_config, workdir)
    out = capsys.readouterr().out
    assert timings == {mode: "skipped" for mode in modes.PIPELINE}
    for mode in modes.PIPELINE:
        assert f"[{mode}] already complete in {workdir}: skipped" in out
    assert f"Report: {report}" in out


def test_run_all_resumes_after_the_last_complete_stage(tmp_path, capsys, monkeypatch):
    """Stages already complete are skipped; the others run in order (fake stages)."""
    workdir = str(tmp_path)
    calls = []
    sentinel = ml_collections.ConfigDict({"sentinel": 1})

    def fake_stage(mode):
        def run(config, wd):
            assert wd == workdir and config is sentinel
            calls.append(mode)
            for rel in workdir_lib.OUTPUTS[mode]:  # outputs that parse: a complete stage
                path = os.path.join(wd, rel)
                os.makedirs(
                    os.path.join(path, "1") if rel.endswith("/") else os.path.dirname(path),
                    exist_ok=True,
                )
                if not rel.endswith("/"):
                    with open(path, "w") as f:
                        f.write("<html></html>" if rel.endswith(".html") else "{}")

        return run

    monkeypatch.setattr(modes, "stage_fn", fake_stage)
    for mode in modes.PIPELINE[:2]:
        fake_stage(mode)(sentinel, workdir)
    calls.clear()
    timings = pipeline.run_all(sentinel, workdir)
    with open(os.path.join(workdir, "config.json")) as f:  # what Explainer.from_workdir reads
        assert json.load(f) == {"sentinel": 1}
    assert calls == list(modes.PIPELINE[2:])
    assert [timings[m] for m in modes.PIPELINE[:2]] == ["skipped", "skipped"]
    out = capsys.readouterr().out
    assert out.count("already complete") == 2 and "Summary:" in out


def test_only_training_stages_rewrite_the_run_record(tmp_path, capsys, monkeypatch):
    """config.json records what made the models: an evaluation with other settings keeps it."""
    workdir, ran = str(tmp_path), []
    monkeypatch.setattr(modes, "stage_fn", lambda mode: lambda config, wd: ran.append(mode))
    trained = ml_collections.ConfigDict({"eval": {"n": 1, "ds": (0.1, 0.2)}, "lr": 0.5})
    other = ml_collections.ConfigDict({"eval": {"n": 2, "ds": (0.1, 0.3)}, "lr": 0.5})
    record = os.path.join(workdir, "config.json")

    def recorded():
        with open(record) as f:
            return json.load(f)

    pipeline.run_stage("evaluate", trained, workdir)  # no record yet: any stage writes one
    assert recorded() == json.loads(trained.to_json())
    pipeline.run_stage("train_generator", trained, workdir)
    capsys.readouterr()
    pipeline.run_stage("evaluate", other, workdir)
    assert recorded() == json.loads(trained.to_json())
    err = capsys.readouterr().err
    assert f"keeps the trained run's record {record}" in err and err.endswith("eval.ds, eval.n\n")
    pipeline.run_stage("report", trained, workdir)  # same settings: nothing to say
    assert capsys.readouterr().err == ""
    pipeline.run_stage("train_generator", other, workdir)  # retraining: the new record
    assert recorded() == json.loads(other.to_json())
    with open(record, "w") as f:
        f.write("{not json")
    pipeline.run_stage("evaluate", trained, workdir)  # a broken record is replaced
    assert recorded() == json.loads(trained.to_json())
    assert ran == [
        "evaluate",
        "train_generator",
        "evaluate",
        "report",
        "train_generator",
        "evaluate",
    ]

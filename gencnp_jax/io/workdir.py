"""Every path of a run's workdir, and the file whose presence marks each stage complete.

WORKDIR/classifier/{checkpoints,final,metrics.json}   train_classifier
WORKDIR/generator/{checkpoints,final,metrics.json}    train_generator
WORKDIR/bank/{checkpoint,bank.json}                   build_bank
WORKDIR/eval/results.{json,md}                        evaluate
WORKDIR/report/index.html                             report
WORKDIR/bench.json                                    bench
"""

from __future__ import annotations

import os

DONE_FILES = {
    "train_classifier": "classifier/metrics.json",
    "train_generator": "generator/metrics.json",
    "build_bank": "bank/bank.json",
    "evaluate": "eval/results.json",
    "report": "report/index.html",
    "bench": "bench.json",
}


def _under(workdir: str, *parts: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), *parts)


def classifier_dir(workdir: str) -> str:
    return _under(workdir, "classifier")


def generator_dir(workdir: str) -> str:
    return _under(workdir, "generator")


def bank_dir(workdir: str) -> str:
    return _under(workdir, "bank")


def eval_dir(workdir: str) -> str:
    return _under(workdir, "eval")


def report_dir(workdir: str) -> str:
    return _under(workdir, "report")


def done_file(mode: str, workdir: str) -> str:
    """The file a complete `mode` stage leaves in `workdir`."""
    return _under(workdir, DONE_FILES[mode])


def is_done(mode: str, workdir: str) -> bool:
    return os.path.exists(done_file(mode, workdir))

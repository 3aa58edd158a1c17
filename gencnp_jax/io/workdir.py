"""Every path of a run's workdir, each stage's outputs and the file that marks it complete.

WORKDIR/classifier/{checkpoints,final,metrics.json}   train_classifier
WORKDIR/generator/{checkpoints,final,metrics.json}    train_generator
WORKDIR/bank/{checkpoint,bank.json}                   build_bank
WORKDIR/eval/results.{json,md}                        evaluate
WORKDIR/report/index.html                             report
WORKDIR/bench.json                                    bench

A stage writes its DONE file last; it counts as complete only while that file and every other
output of `OUTPUTS` exist and parse (`check_done`): a file cut short by a crash, a full disk
or a hand edit makes the stage run again.
"""

from __future__ import annotations

import json
import os
import re
import zipfile


class StageOrderError(RuntimeError):
    """A stage was run before the stage it needs (its outputs are missing from the workdir)."""


DONE_FILES = {
    "train_classifier": "classifier/metrics.json",
    "train_generator": "generator/metrics.json",
    "build_bank": "bank/bank.json",
    "evaluate": "eval/results.json",
    "report": "report/index.html",
    "bench": "bench.json",
}

# Every output a complete stage leaves (the DONE file last); folders are orbax checkpoints.
OUTPUTS = {
    "train_classifier": ("classifier/final/", "classifier/metrics.json"),
    "train_generator": ("generator/final/", "generator/metrics.json"),
    "build_bank": ("bank/checkpoint/", "bank/bank.json"),
    "evaluate": ("eval/results.md", "eval/results.json"),
    "report": ("report/index.html",),  # and every PNG the page shows
    "bench": ("bench.json",),
}
_PNG_HEAD, _PNG_TAIL = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


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
    return check_done(mode, workdir)[0]


def check_done(mode: str, workdir: str) -> tuple[bool, str | None]:
    """``(complete, problem)``: `problem` names the first damaged output of a stage whose DONE
    file exists (None when the stage is complete or was never finished)."""
    if not os.path.exists(done_file(mode, workdir)):
        return False, None
    for rel in OUTPUTS[mode]:
        path = _under(workdir, rel)
        problem = output_problem(path)
        if problem is None and path.endswith(".html"):
            problem = _page_images_problem(path)
        if problem is not None:
            return False, problem if problem.startswith("/") else f"{path} {problem}"
    return True, None


def output_problem(path: str) -> str | None:
    """None when the output at `path` exists and parses; else what is wrong with it.

    JSON must parse, HTML must end with ``</html>``, a PNG must start with the PNG signature and
    end with its IEND chunk, an ``.npz`` must be a whole zip archive, other files non-empty; a
    folder (a checkpoint) must hold a committed step.
    """
    if path.endswith("/"):
        path = path.rstrip("/")
        if not os.path.isdir(path):
            return "is missing"
        return None if any(n.isdigit() for n in os.listdir(path)) else "holds no saved step"
    if not os.path.isfile(path):
        return "is missing"
    try:
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif path.endswith(".npz"):
            with zipfile.ZipFile(path) as z:
                if z.testzip() is not None:
                    return "is damaged (a zip member fails its CRC)"
        elif path.endswith(".png"):
            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, os.path.getsize(path) - 8))
                if head != _PNG_HEAD or f.read(8) != _PNG_TAIL:
                    return "is not a whole PNG image (cut short?)"
        elif path.endswith(".html"):
            with open(path, encoding="utf-8") as f:
                if not f.read().rstrip().endswith("</html>"):
                    return "is cut short (no closing </html>)"
        elif os.path.getsize(path) == 0:
            return "is empty"
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        return f"does not parse ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    return None


def _page_images_problem(page: str) -> str | None:
    with open(page, encoding="utf-8") as f:
        sources = re.findall(r'<img src="([^"]+\.png)"', f.read())
    for src in sources:
        path = os.path.join(os.path.dirname(page), *src.split("/"))
        problem = output_problem(path)
        if problem is not None:
            return f"{path} {problem}"
    return None

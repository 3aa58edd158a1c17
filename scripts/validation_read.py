"""A run's GEN-CNP and class pathways read on validation images: how the defaults are chosen.

    python scripts/validation_read.py WORKDIR [--examples=1000] [--bank-counts=20,21,...]

Reads the run's generator as the evaluation's validation block does (`stages/evaluate.py`):
the first `examples` validation images, under the run's first ablation, the explained class
the full model's prediction. Prints one JSON object:

* ``at_density``: mDC, agreement and leakage of GEN-CNP's top ``round(d N)`` channels at
  each of ``eval.densities`` (ties broken as the evaluation breaks them);
* ``own``: its own gates (density, agreement, mDC, leakage), beside ``random_own``: random
  masks of the same per-site densities;
* ``bank`` (with `--bank-counts`, for a run whose bank is built): one row per count ``n``,
  the class pathways that keep each neuron ``n`` or more of the bank's ``j`` samples per
  class keep (``rho = (n - 0.5) / j``: ``F_c`` moves in steps of ``1 / j``, so a threshold
  between two steps is safe from float rounding), read as the evaluation reads
  ``gencnp_transfer`` at its own density: density, agreement, mDC and class leakage (the
  pathway of another class keeping that class on this image).

The test split is never read. docs/RESULTS.md records the tables these rows made.
"""

from __future__ import annotations

import argparse
import json
import sys

KEYS = ("density_mean", "agreement", "mDC", "leakage", "class_leakage")


def read(workdir: str, examples: int, bank_counts=(), config=None) -> dict:
    """The JSON object of the module doc; `config` None reads the run's recorded one. Each
    ``bank`` row also holds its ``pathways`` (``f32[K, N]``), left out of the printout."""
    import jax
    import numpy as np

    from gencnp_jax.context import inputs, record
    from gencnp_jax.eval import methods as eval_methods
    from gencnp_jax.method import class_bank
    from gencnp_jax.models import gates as gates_lib
    from gencnp_jax.stages import build_bank, evaluate
    from gencnp_jax.stages import evaluate_passes as passes

    config = record.saved_config(workdir) if config is None else config
    run, every_fill = evaluate.open_run(config, workdir)
    ablation = config.eval.ablations[0]
    fills = every_fill[ablation]
    classifier = run.classifier.with_fills(fills)
    validation = inputs.load_data(config, "validation")
    n = min(len(validation.labels), examples)
    val = evaluate.make_subset(
        run, classifier, validation.images[:n], "validation", config.seed + 1
    )
    densities = tuple(float(d) for d in config.eval.densities)
    settings = evaluate.settings_from_config(config)
    ev = evaluate.Evaluation(
        run, val, val, {ablation: fills}, (ablation,), densities, settings, 0
    )  # fmt: skip
    score_fns = eval_methods.make_score_fns(settings)
    scores, _ = evaluate.score(run, classifier, val.images, score_fns, ("gencnp",))
    scores.per_method["random"] = np.asarray(
        jax.random.uniform(run.key("random_scores"), (n, classifier.num_neurons))
    )
    no_tables = evaluate.ClassTables({}, None)
    fns = {extra: eval_methods.make_metric_fn(extra) for extra in (False, True)}
    pick = lambda m: {k: m[k] for k in KEYS if k in m}  # noqa: E731
    out = {"workdir": workdir, "split": "validation", "num_examples": int(n), "ablation": ablation}
    out["at_density"] = {}
    for d in densities:
        masks = evaluate.masks_of(ev, scores, no_tables, "gencnp", d)
        m, _ = passes.metric_pass(run, fns[False], classifier, val, masks, val.full_logits)
        out["at_density"][str(d)] = pick(m)
    for name, key in (("gencnp", "own"), ("random", "random_own")):
        masks = evaluate.masks_of(ev, scores, no_tables, name, "own")
        out[key] = pick(passes.metric_pass(run, fns[True], classifier, val, masks)[0])
    out["bank"] = []
    if bank_counts:
        bank = build_bank.load_bank(config, workdir, classifier)
        j = max(int(np.max(np.asarray(bank.counts))), 1)
        for count in bank_counts:
            rho = (count - 0.5) / j
            pathways_KxN = np.asarray(
                gates_lib.flatten(class_bank.pathways(bank.freq, bank.counts, rho))
            )
            masks = evaluate.class_masks_of(val, pathways_KxN)
            m, _ = passes.metric_pass(run, fns[True], classifier, val, masks)
            row = {"kept_by": count, "of": j, "rho": round(rho, 4), **pick(m)}
            out["bank"].append({**row, "pathways": pathways_KxN})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--bank-counts", default="", help="comma-separated counts, e.g. 20,21,22")
    args = parser.parse_args(argv)
    counts = tuple(int(c) for c in args.bank_counts.split(",") if c)
    import jax

    from gencnp_jax.context import record

    config = record.saved_config(args.workdir)
    if config.cpu_devices > 0:  # as launch.py: the run's host devices
        jax.config.update("jax_num_cpu_devices", config.cpu_devices)
    out = read(args.workdir, args.examples, counts, config)
    out["bank"] = [{k: v for k, v in row.items() if k != "pathways"} for row in out["bank"]]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

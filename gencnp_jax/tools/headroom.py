"""How much a per-image mask beats the best class mask found (``--mode=headroom``).

The evaluation's references alone (`stages/references.py`, the same searches and cache),
beside GEN-CNP on the same images: at each of ``eval.densities``, under the run's ablation, on
the first ``eval.reference_examples`` images of the common test subset,

* ``instance_reference``: the best per-image mask found (each image: its PIO ranking, an
  instance search from it, or its class's class-reference mask, the lowest drop);
* ``class_reference``: the best one-mask-per-class found (chosen on validation images);
* ``gencnp``: GEN-CNP's top-d.

``reference_gain = mDC(class_reference) / mDC(instance_reference)``: the specificity gain the
best per-image masks we found show over the best class mask we found. A yardstick, not a
bound: better masks may exist on either side. Writes ``WORKDIR/eval/headroom.{json,md}``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import controls
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers
from gencnp_jax.stages import build_bank, evaluate, references
from gencnp_jax.stages import evaluate_passes as passes


def headroom(config, workdir: str) -> dict:
    """The references and GEN-CNP on the reference images (see module doc)."""
    t0, e = time.time(), config.eval
    classifier = loading.load_classifier(config, workdir)
    generator, classifier, _ = loading.load_generator(config, workdir, classifier)
    try:  # the class pathways are one of the class reference's candidates, if built
        bank = build_bank.load_bank(config, workdir, classifier)
    except workdir_lib.StageOrderError:
        print("headroom: no class-pathway bank in the workdir: its ranking is not a candidate")
        bank = None
    run = passes.Run(
        inputs.make_mesh(config),
        e.batch_size,
        generator,
        classifier,
        lambda x: inputs.normalize(config, x),
        config.seed,
    )
    test = inputs.load_data(config, "test")
    validation = inputs.load_data(config, "validation")
    n = min(len(test.labels), int(e.reference_examples))
    n_val = min(len(validation.labels), e.num_examples or len(validation.labels))
    subset = evaluate.make_subset(run, classifier, test.images[:n], "test", config.seed)
    val = evaluate.make_subset(
        run, classifier, validation.images[:n_val], "validation", config.seed
    )
    densities = tuple(float(d) for d in e.densities)
    score_fns = eval_methods.make_score_fns(evaluate.settings_from_config(config))
    gen, _ = evaluate.score(run, classifier, subset.images, score_fns, eval_methods.SCORED)
    train = inputs.load_data(config, "train")
    ev = evaluate.Evaluation(
        run, subset, val, {config.generator.ablation: classifier.fills},
        (config.generator.ablation,), densities, evaluate.settings_from_config(config), 0,
    )  # fmt: skip
    tables = evaluate.class_tables(ev, score_fns, bank, train.images[: e.control_examples])
    refs = evaluate.reference_phase(ev, config, workdir, tables[ev.headline], gen)
    rows = {}
    for d in densities:
        gencnp = passes.top_k(gen.per_method["gencnp"], d, run.key("gencnp", d))
        drop = lambda masks: (
            100.0
            * float(
                np.mean(references.drops(run, classifier, subset.images, subset.full_logits, masks))
            )
        )
        inst = refs.instance_reference
        row = {
            "gencnp": drop(gencnp),
            "class_reference": 100.0 * float(np.mean(inst.class_drop_B[str(d)])),
            "instance_reference": 100.0 * float(np.mean(inst.drop_B[str(d)])),
        }
        row["reference_gain"] = controls.specificity_gain(
            row["class_reference"], row["instance_reference"]
        )
        row["instance_sources"] = inst.sources[str(d)]
        rows[str(d)] = row
    results = passes.none_for_nan(
        {
            "num_examples": n,
            "ablation": config.generator.ablation,
            "steps": int(e.reference_steps),
            "at_density": rows,
            "note": "yardsticks, not bounds: the best masks our searches found",
            "seconds": round(time.time() - t0, 2),
        }
    )
    out_dir = workdir_lib.eval_dir(workdir)
    writers.write_json(os.path.join(out_dir, "headroom.json"), results)
    writers.write_text(os.path.join(out_dir, "headroom.md"), table(results))
    print(table(results))
    return results


def table(results: dict) -> str:
    """A markdown table of `headroom` results: mDC per row and density."""
    ds = list(results["at_density"])
    lines = [
        f"# Headroom: references and GEN-CNP ({results['num_examples']} test images, "
        f"{results['ablation']} ablation, {results['steps']} search steps; yardsticks, not bounds)",
        "",
        "| mask | " + " | ".join(f"mDC @ {d}" for d in ds) + " |",
        "|---|" + "---|" * len(ds),
    ]
    for name in ("gencnp", "class_reference", "instance_reference", "reference_gain"):
        values = [results["at_density"][d][name] for d in ds]
        lines.append(
            f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in values) + " |"
        )
    return "\n".join(lines) + "\n"

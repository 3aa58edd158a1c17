"""One source of truth for defaults: `configs/default.py`.

Every component is built from ``default.get_config()``; constructors of hyper-parameters have
no defaults of their own, and no function of the package defaults a config field's parameter
to another value. A run's recorded config is read back over today's defaults.
"""

import ast
import dataclasses
import inspect
import json
import pathlib

import pytest

from configs import default
from gencnp_jax.context import loading, record
from gencnp_jax.eval import baselines
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.method import losses, objective, pio
from gencnp_jax.models import generator as generator_lib
from gencnp_jax.stages import evaluate
from gencnp_jax.train import generator as train_generator
from gencnp_jax.train import pio_targets

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gencnp_jax"


def _leaves(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_component_builds_from_the_default_config():
    config = default.get_config()
    g = config.generator
    model = loading.new_generator(config, {"a": 4, "b": 8}, 10)
    assert model.hidden == g.model.hidden and model.pooling == tuple(g.model.pooling)
    assert model.grad_evidence == g.model.grad_evidence
    assert model.rank_head == (g.loss.w_rank > 0)
    hp, weights = train_generator.hparams_from_config(g)
    assert float(hp.temperature) == g.daq.temperature and float(hp.tau) == g.loss.tau
    assert {f"w_{t}" for t in losses.TERMS} == {k for k in g.loss if k.startswith("w_")}
    for term in losses.TERMS:
        assert float(getattr(weights, term)) == pytest.approx(g.loss[f"w_{term}"]), term
    pio_hp = pio_targets.hparams(config)
    assert float(pio_hp.leak_margin) == g.loss.leak_margin and int(pio_hp.steps) == g.pio.steps
    settings = evaluate.settings_from_config(config)
    assert settings.cdrp.steps == config.eval.cdrp_steps
    assert settings.intgrad_steps == config.eval.intgrad_steps


@pytest.mark.parametrize(
    "record_type",
    [
        losses.LossWeights,
        objective.StepHParams,
        pio.PioHParams,
        eval_methods.Settings,
        baselines.CdrpSettings,
    ],
)
def test_hyper_parameter_records_have_no_defaults(record_type):
    fields = dataclasses.fields(record_type)
    assert fields and all(f.default is dataclasses.MISSING for f in fields), record_type


def test_the_generator_takes_every_hyper_parameter_as_a_required_keyword():
    params = inspect.signature(generator_lib.Generator.__init__).parameters
    hyper = set(default.get_config().generator.model)
    assert hyper <= set(params)
    for name in hyper:
        assert params[name].default is inspect.Parameter.empty, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


# A function parameter of one of these names means the config field; a default for it must
# be the config's value. (tau = 1: a plain KL, no temperature; not the config's tau.)
MIRRORED = {
    "temperature": "generator.daq.temperature",
    "sigma": "generator.daq.sigma",
    "hidden": "generator.model.hidden",
    "cell": "generator.model.cell",
    "pooling": "generator.model.pooling",
    "init_open": "generator.model.init_open",
    "grad_evidence": "generator.model.grad_evidence",
    "depth": "classifier.depth",
    "seed": "seed",
    "normalization": "data.normalization",
    "intgrad_steps": "eval.intgrad_steps",
    "cdrp_steps": "eval.cdrp_steps",
    "samples_per_class": "bank.samples_per_class",
    "threshold": None,  # cdrp's, the bank's: no default allowed at all
    "leak_margin": "generator.loss.leak_margin",
    "hinge_margin": "generator.loss.hinge_margin",
}


def _literal_defaults():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            a = node.args
            positional = a.posonlyargs + a.args
            tail = positional[len(positional) - len(a.defaults) :]
            pairs = list(zip(tail, a.defaults, strict=True))
            given = zip(a.kwonlyargs, a.kw_defaults, strict=True)
            pairs += [(x, d) for x, d in given if d is not None]
            for arg, value in pairs:
                yield f"{path.relative_to(PACKAGE)}:{node.name}", arg.arg, value


def test_no_function_contradicts_a_config_default():
    config = _leaves(default.get_config())
    contradictions = []
    for where, name, node in _literal_defaults():
        if name not in MIRRORED:
            continue
        try:
            value = ast.literal_eval(node)
        except ValueError:
            continue  # not a literal: computed from something else
        field = MIRRORED[name]
        if value is None:
            continue  # "not given": the caller's value is used
        if field is None or config[field] != value:
            contradictions.append(f"{where}({name}={value!r}) vs config.{field}")
    assert not contradictions, contradictions


def test_a_recorded_config_is_read_back_over_todays_defaults(tmp_path):
    recorded = default.get_config().to_dict()
    recorded["generator"]["model"]["hidden"] = 32  # the run's own value is kept
    del recorded["train"]  # an older run: its batch size under the classifier
    recorded["classifier"]["batch_size"] = 64  # renamed since: train.batch_size
    recorded["generator"]["loss"]["w_pull"] = 0.0  # retired since: dropped
    del recorded["bench"]  # added since the run: today's default
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = record.saved_config(str(tmp_path))
    assert config.generator.model.hidden == 32
    assert config.train.batch_size == 64
    assert "w_pull" not in config.generator.loss
    assert config.bench.repeats == default.get_config().bench.repeats
    assert config.generator.model.pooling == ("avg", "max")  # JSON lists back to tuples
    # added since with a default that changes the model: the value runs had before them
    del recorded["generator"]["model"]["grad_evidence"], recorded["generator"]["loss"]["w_rank"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = record.saved_config(str(tmp_path))
    assert config.generator.model.grad_evidence is False
    assert config.generator.loss.w_rank == 0.0
    assert default.get_config().generator.model.grad_evidence is True  # not today's default

"""A user's weights on disk (`io/weights.py`): every format reads back to the same flat form,
weights that do not fit the model are named, and `gencnp_jax.load_weights` fills a model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gencnp_jax.io import weights


class Net(nnx.Module):
    def __init__(self, width=4):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # RNG state: never saved
        self.head = nnx.Linear(width, 3, rngs=rngs)


def _want(model) -> dict:
    return {k: np.asarray(v) for k, v in weights.flatten(weights.pure_tree(model)).items()}


def test_every_format_reads_back_the_same(tmp_path):
    model = Net()
    want = _want(model)
    assert "conv/kernel" in want and "bn/mean" in want
    assert not any("rngs" in k or "count" in k for k in want)
    got = {
        "npz": weights.read_weights(weights.save_weights(model, str(tmp_path / "w.npz"))),
        "msgpack": weights.read_weights(weights.save_weights(model, str(tmp_path / "w.msgpack"))),
    }
    tree = jax.device_get(weights.pure_tree(model))
    with ocp.PyTreeCheckpointer() as ckptr:  # an orbax item directory...
        ckptr.save(str(tmp_path / "item"), tree)
    got["orbax item"] = weights.read_weights(str(tmp_path / "item"))
    manager = ocp.CheckpointManager(str(tmp_path / "manager"))  # ...and a manager's steps
    for step in (3, 7):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
    manager.wait_until_finished()
    manager.close()
    got["orbax manager"] = weights.read_weights(str(tmp_path / "manager"))
    for name, flat in got.items():
        assert sorted(flat) == sorted(want), name
        for key, value in want.items():
            np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=f"{name} {key}")


def test_fit_places_values_and_names_what_does_not_fit(tmp_path):
    model, other = Net(), Net()
    other.head.bias.value = jnp.arange(3.0)
    template = weights.pure_tree(model)
    fitted = weights.fit(_want(other), template, "src")
    np.testing.assert_array_equal(fitted["head"]["bias"], np.arange(3.0))
    assert jax.tree.structure(fitted) == jax.tree.structure(template)
    wide = _want(Net(width=8))
    with pytest.raises(weights.WeightsError, match=r"classifier checkpoint src: 'bn/bias' has "
                       r"shape \(8,\), the model's is \(4,\)"):  # fmt: skip
        weights.fit(wide, template, "src")
    partial = {k: v for k, v in _want(other).items() if k != "head/kernel"}
    partial["extra/w"] = np.zeros(2)
    with pytest.raises(weights.WeightsError, match=r"missing \['head/kernel'\], unexpected "
                       r"\['extra/w'\]"):  # fmt: skip
        weights.fit(partial, template, "src")


def test_unreadable_weights_are_one_clear_line(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(weights.WeightsError, match=r"bad.npz is not an .npz \(zip\) file"):
        weights.read_weights(str(tmp_path / "bad.npz"))
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(weights.WeightsError, match=r"unknown format; give .npz"):
        weights.read_weights(str(tmp_path / "w.pt"))
    with pytest.raises(weights.WeightsError, match=r"end it with .npz or .msgpack"):
        weights.save_weights(Net(), str(tmp_path / "w.pt"))


def test_load_weights_fills_a_model_and_names_a_mismatch(tmp_path):
    import flax.linen as nn

    import gencnp_jax

    trained, fresh = Net(), Net()
    trained.head.bias.value = jnp.arange(3.0)
    trained.bn.mean.value = jnp.full((4,), 2.0)
    path = gencnp_jax.save_weights(trained, str(tmp_path / "w.npz"))
    assert gencnp_jax.load_weights(fresh, path) is fresh  # NNX: in place
    np.testing.assert_array_equal(fresh.head.bias.value, np.arange(3.0))
    np.testing.assert_array_equal(fresh.bn.mean.value, np.full((4,), 2.0))
    with pytest.raises(weights.WeightsError, match=r"^weights .*w.npz: 'bn/bias' has shape "
                       r"\(4,\), the model's is \(8,\)$"):  # fmt: skip
        gencnp_jax.load_weights(Net(width=8), path)
    with pytest.raises(weights.WeightsError, match=r"^weights .*nowhere.npz does not exist"):
        gencnp_jax.load_weights(fresh, str(tmp_path / "nowhere.npz"))
    module = nn.Dense(3)  # Linen: the filled variables come back
    variables = module.init(jax.random.key(0), jnp.ones((1, 2)))
    other = module.init(jax.random.key(1), jnp.ones((1, 2)))
    path = gencnp_jax.save_weights(other, str(tmp_path / "w.msgpack"))
    loaded = gencnp_jax.load_weights(variables, path)
    chex.assert_trees_all_equal(dict(loaded), jax.device_get(dict(other)))
    with pytest.raises(TypeError, match=r"an NNX module or a Linen variables dict, got str"):
        gencnp_jax.load_weights("w.npz", path)

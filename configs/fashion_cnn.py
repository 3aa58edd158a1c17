"""Your own model, explained: `examples/fashion_cnn.py` (a Flax NNX CNN that knows nothing of
gencnp_jax) through `classifier.factory` + `classifier.checkpoint`, gated at its ReLUs.

python -m examples.fashion_cnn --out=runs/fashion_cnn_weights.npz      # train it (~1 min)
python launch.py --config=configs/fashion_cnn.py --workdir=runs/fashion_cnn --mode=all
"""

from configs import default


def get_config():
    c = default.get_config()
    c.classifier.factory = "examples.fashion_cnn:build"  # build(**factory_kwargs) -> nnx.Module
    c.classifier.factory_kwargs.num_classes = 10
    c.classifier.checkpoint = "runs/fashion_cnn_weights.npz"
    c.classifier.sites = ("blocks/*/layers/2",)  # the ReLU of each conv block
    return c

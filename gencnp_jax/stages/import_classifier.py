"""The `train_classifier` stage for a user's own model: import its weights, do not train.

With ``config.classifier.factory`` set, the stage builds the model, loads
``config.classifier.checkpoint``, gates it at ``config.classifier.sites``, copies the weights
into ``WORKDIR/classifier/final`` (the run keeps the exact weights it explains, whatever
later happens to the user's file) and writes the same metrics as a trained classifier.
"""

from __future__ import annotations

import os

from gencnp_jax.context import inputs, user_model
from gencnp_jax.io import checkpointing, data, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.train import classifier as train_classifier


def classifier_stage(config, workdir: str) -> dict:
    """`train_classifier` mode: trains a built-in classifier, or imports the user's."""
    if user_model.uses_factory(config):
        return import_classifier(config, workdir)
    return train_classifier.train_classifier(config, workdir)


def import_classifier(config, workdir: str) -> dict:
    """Imports the factory model's checkpoint into `workdir` and measures it.

    Raises:
      user_model.UserModelError: no checkpoint configured (the pipeline trains only the
        built-in classifiers), or a factory / sites / output size that does not work.
    """
    c = config.classifier
    if not c.checkpoint:
        raise user_model.UserModelError(
            f"config.classifier.factory={c.factory!r} needs config.classifier.checkpoint: the "
            f"pipeline trains only the built-in classifiers ('vgg', 'resnet'); train yours, "
            f"save it with gencnp_jax.save_weights(model, 'weights.npz') and point "
            f"checkpoint at that file"
        )
    out_dir = workdir_lib.classifier_dir(workdir)
    train, test = inputs.load_data(config, "train"), inputs.load_data(config, "test")
    mesh = inputs.make_mesh(config)
    d = config.data
    hwc, num_classes = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
    gated = user_model.build_gated(config, hwc, num_classes)
    final_ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final_ckpt.save(0, {"state": user_model.saved_part(gated.state)})
    final_ckpt.close()
    classifier = FrozenClassifier(gated, gated.state, gated.site_channels, num_classes)
    metrics = train_classifier.evaluate_classifier(
        config, classifier, {"train": train, "test": test}, mesh
    )
    metrics.update(
        normalization=config.data.normalization,
        imported_from=os.path.abspath(os.path.expanduser(c.checkpoint)),
        factory=c.factory,
        train_steps=0,
        num_devices=mesh.size,
        site_channels=dict(gated.site_channels),
    )
    print(
        f"[train_classifier] imported {c.factory} with the weights of {c.checkpoint} (not "
        f"trained here): test accuracy {metrics['test_accuracy']:.4f} with inputs "
        f"{inputs.describe_normalization(config)}",
        flush=True,
    )
    writers.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics

"""A trained classifier and generator from a workdir, ready to explain images (notebooks).

explainer = Explainer.from_workdir("runs/default")   # the config the run saved, or pass one
pathway = explainer(images_uint8)                    # Pathway: gates, scores, logits
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading, record
from gencnp_jax.eval import saliency as saliency_lib
from gencnp_jax.io import batched, data, sharding, writers
from gencnp_jax.method.explain import jit_explain
from gencnp_jax.method.pathway import Pathway


class Explainer:
    """A trained classifier + generator, ready to explain images.

    The states are replicated over the config's device mesh once; every call feeds the jitted
    explain padded batches of one size, so it compiles once per batch size, never per number
    of images.
    """

    def __init__(self, config, classifier, gen_graphdef, gen_state, fills):
        self.config = config
        self.mesh = inputs.make_mesh(config)
        gen_state, cls_state, fills = sharding.replicate(
            self.mesh, (gen_state, classifier.state, fills)
        )
        self.classifier = dataclasses.replace(classifier, state=cls_state)
        self.gen_graphdef, self.gen_state, self.fills = gen_graphdef, gen_state, fills
        daq = config.generator.daq
        self._temperature, self._sigma = jnp.float32(daq.temperature), jnp.float32(daq.sigma)
        self._explain = jit_explain(gen_graphdef, classifier.graphdef)
        self._saliency_fns = {}  # site -> jitted saliency, compiled on first use

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, config=None) -> Explainer:
        """The trained classifier and generator of `workdir`.

        Args:
          workdir: the run's folder.
          config: the run's config; None reads the one the run saved, ``WORKDIR/config.json``.
            The older order ``from_workdir(config, workdir)`` works too.

        Raises:
          FileNotFoundError: no config given and none saved in `workdir`.
          workdir_lib.StageOrderError: no trained classifier or generator in `workdir`.
        """
        if not isinstance(workdir, str | os.PathLike) and isinstance(config, str | os.PathLike):
            workdir, config = config, workdir  # the older order
        if not isinstance(workdir, str | os.PathLike):
            raise TypeError(f"workdir must be a path, got {type(workdir).__name__}")
        workdir = os.fspath(workdir)
        config = record.saved_config(workdir) if config is None else config
        classifier = loading.load_classifier(config, workdir)
        gd, state, fills, _ = loading.load_generator(config, workdir, classifier)
        return cls(config, classifier, gd, state, fills)

    def prepare(self, images) -> np.ndarray:
        """Images as the classifier takes them: uint8 ones normalised, float ones as they are.

        Raises:
          ValueError: not NxHxWxC of the classifier's size, no images, an integer dtype other
            than uint8, or NaN/inf values.
        """
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = inputs.normalize(self.config, images)
        elif not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"images of dtype {images.dtype}: pass uint8 pixels (0..255, normalised here) "
                f"or float images normalised with data.normalize"
            )
        d = self.config.data
        hwc, _ = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
        data.validate_images(images, hwc)
        if not len(images):
            raise ValueError(f"no images to explain: got shape {tuple(images.shape)}")
        return images

    def batch_size(self, batch_size: int | None = None) -> int:
        """`batch_size` (default ``config.eval.batch_size``) rounded up to the mesh size."""
        size = int(batch_size or self.config.eval.batch_size)
        if size <= 0:
            raise ValueError(f"batch_size must be positive, got {size}")
        return -(-size // self.mesh.size) * self.mesh.size

    def map_batches(self, fn, images: np.ndarray, batch_size: int | None = None, desc: str = ""):
        """``fn(batch)`` over prepared `images` in padded batches of one size (`batched`).

        Args:
          fn: a sharded batch -> a pytree with the batch on axis 0; a jitted function that
            reads this explainer's (replicated) states.
          images: ``f32[N, H, W, C]`` from `prepare`.
          batch_size: rows per call (see `batch_size`); the last batch repeats its last row.
          desc: label of the progress bar, shown when there are several batches.

        Returns:
          The outputs of every image, in order, padding dropped (host numpy).
        """
        n, size = len(images), self.batch_size(batch_size)
        with writers.progress(n, desc=desc, disable=n <= size) as bar:
            return batched.map_batches(
                fn, lambda idx: images[idx], n, size, self.mesh, progress=bar.update
            )

    def __call__(self, images, batch_size: int | None = None) -> Pathway:
        """Explains images, in padded batches of `batch_size` (default
        ``config.eval.batch_size``): the same result as one batch of them all.

        Returns:
          The Pathway of every image (sites in the classifier's order).

        Raises:
          ValueError: see `prepare`.
        """
        images = self.prepare(images)
        t, sigma = self._temperature, self._sigma

        def fn(batch):
            return self._explain(self.gen_state, self.classifier.state, batch, t, sigma, self.fills)

        p = self.map_batches(fn, images, batch_size, desc="explain")
        sites = list(self.classifier.site_channels)  # jit returns them sorted by name
        p = p.replace(gates={s: p.gates[s] for s in sites}, scores={s: p.scores[s] for s in sites})
        return jax.tree.map(jnp.asarray, p)

    def saliency(
        self, images, site: str | None = None, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grad-CAM of the explained class on the full and on the pathway model, and the
        pathway gradient (`gencnp_jax.eval.saliency`), in padded batches as `__call__`.

        Args:
          images: as for `__call__` (uint8 pixels, or floats normalised with data.normalize).
          site: the gate site whose activation Grad-CAM weighs (4-D, NxHxWxC); None takes
            ``config.eval.gradcam_site``, or the deepest site when that is ``""``.
          batch_size: rows per call; default ``config.eval.batch_size``.

        Returns:
          ``(cam_full f32[N, H, W], cam_pathway f32[N, H, W], grad f32[N, H, W, C])`` as host
          numpy: the maps of the class each pathway explains (the prediction), each Grad-CAM
          divided by its per-image maximum; the gradient of that class's logit w.r.t. the
          input through the pathway-gated model.

        Raises:
          ValueError: `site` is not a gate site of the classifier; images as in `prepare`.
        """
        sites = self.classifier.site_channels
        site = site or self.config.eval.get("gradcam_site", "") or list(sites)[-1]
        if site not in sites:
            raise ValueError(f"site {site!r} is not a gate site of this classifier: {list(sites)}")
        images = self.prepare(images)
        if site not in self._saliency_fns:
            gen_gd, cls_gd = self.gen_graphdef, self.classifier.graphdef

            def fn(gen_state, cls_state, fills, batch, temperature, sigma):
                return saliency_lib.pathway_saliency(
                    gen_gd, gen_state, cls_gd, cls_state, batch, temperature, sigma, fills, site
                )

            self._saliency_fns[site] = jax.jit(fn)
        jitted, t, sigma = self._saliency_fns[site], self._temperature, self._sigma

        def run(batch):
            return jitted(self.gen_state, self.classifier.state, self.fills, batch, t, sigma)

        return self.map_batches(run, images, batch_size, desc="saliency")

"""A trained classifier and generator, ready to explain images (notebooks, the explain mode).

    explainer = Explainer.from_workdir("runs/default")   # a run's models and settings
    pathway = explainer(images_uint8)                    # Pathway: gates, scores, logits

Images: ``N x H x W x C``, ``N x H x W`` (one channel) or one image (``H x W x C``, ``H x W``);
uint8 pixels are normalised as the run was (``config.data.normalization``), float ones are taken
as already in the model's scale.

`Explainer(...)` takes its parts explicitly; only `from_workdir` reads a config (the one the run
recorded in ``WORKDIR/config.json``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading, record
from gencnp_jax.eval import saliency as saliency_lib
from gencnp_jax.io import batched, data, sharding, writers
from gencnp_jax.method.explain import jit_explain
from gencnp_jax.method.pathway import SITE_FIELDS, Pathway
from gencnp_jax.models import daq
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator


class Explainer:
    """A trained classifier + generator, ready to explain images.

    The models are replicated over the device mesh once; every call feeds the jitted explain
    padded batches of one size, so it compiles once per batch size, never per number of
    images.
    """

    def __init__(
        self,
        generator: FrozenGenerator,
        classifier: FrozenClassifier,
        *,
        normalize: Callable[[np.ndarray], np.ndarray],
        image_shape: tuple[int, int, int],
        settings: daq.Settings,
        batch_size: int,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """
        Args:
          generator: the trained generator.
          classifier: the classifier it explains, with the fills of its closed gates.
          normalize: uint8 ``N x H x W x C`` pixels -> the float images the classifier takes
            (`from_workdir`: the run's ``config.data.normalization``).
          image_shape: ``(H, W, C)`` of the classifier's input.
          settings: DAQ's temperature and kernel width (the generator's training values).
          batch_size: images per call (rounded up to the mesh size).
          mesh: the device mesh; None = every local device.
        """
        self.mesh = mesh if mesh is not None else sharding.make_mesh(None)
        self.generator, self.classifier = sharding.replicate(self.mesh, (generator, classifier))
        self.normalize, self.image_shape = normalize, tuple(image_shape)
        self.settings, self.default_batch_size = settings, int(batch_size)
        self._saliency_fns = {}  # site -> jitted saliency, compiled on first use

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, config=None) -> Explainer:
        """The trained classifier and generator of `workdir`, with the run's settings.

        Args:
          workdir: the run's folder.
          config: the run's config; None reads the one the run recorded, ``WORKDIR/config.json``.

        Raises:
          FileNotFoundError: no config given and none saved in `workdir`.
          workdir_lib.StageOrderError: no trained classifier or generator in `workdir`.
        """
        if not isinstance(workdir, str | os.PathLike):
            raise TypeError(f"workdir must be a path, got {type(workdir).__name__}")
        workdir = os.fspath(workdir)
        config = record.saved_config(workdir) if config is None else config
        generator, classifier, _ = loading.load_generator(
            config, workdir, loading.load_classifier(config, workdir)
        )
        d, g = config.data, config.generator
        hwc, _ = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
        return cls(
            generator,
            classifier,
            normalize=lambda images: inputs.normalize(config, images),
            image_shape=hwc,
            settings=daq.Settings.create(g.daq.temperature, g.daq.sigma),
            batch_size=config.eval.batch_size,
            mesh=inputs.make_mesh(config),
        )

    def prepare(self, images) -> np.ndarray:
        """Images as the classifier takes them, ``f32[N, H, W, C]``.

        Accepts what the datasets hold: a batch ``N x H x W x C`` or, for a one-channel model,
        ``N x H x W``; one image ``H x W x C`` (or ``H x W``) becomes a batch of one. uint8
        pixels (0..255) are normalised here (the run's ``config.data.normalization``); float
        images are taken as already in the model's scale (normalised as it was trained).

        Raises:
          ValueError: another shape or size, no images, an integer dtype other than uint8, or
            NaN/inf values.
        """
        images = data.as_batch(np.asarray(images), self.image_shape)
        if images.dtype == np.uint8:
            images = self.normalize(images)
        elif not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"images of dtype {images.dtype}: pass uint8 pixels (0..255, normalised here) "
                f"or float images normalised as the classifier was trained"
            )
        data.validate_images(images, self.image_shape)
        if not len(images):
            raise ValueError(f"no images to explain: got shape {tuple(images.shape)}")
        return images

    def batch_size(self, batch_size: int | None = None) -> int:
        """`batch_size` (default: the explainer's) rounded up to the mesh size."""
        size = int(batch_size or self.default_batch_size)
        if size <= 0:
            raise ValueError(f"batch_size must be positive, got {size}")
        return -(-size // self.mesh.size) * self.mesh.size

    def map_batches(self, fn, images: np.ndarray, batch_size: int | None = None, desc: str = ""):
        """``fn(batch)`` over prepared `images` in padded batches of one size (`batched`).

        Args:
          fn: a sharded batch -> a pytree with the batch on axis 0; a jitted function that
            reads this explainer's (replicated) models.
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
        """Explains images in padded batches: the same result as one batch of them all.

        Args:
          images: see `prepare` (uint8 pixels, or floats already in the model's scale; a batch
            or one image).
          batch_size: rows per call; default the explainer's.

        Returns:
          The Pathway of every image (sites in the classifier's order; one image: a batch of 1).

        Raises:
          ValueError: see `prepare`.
        """
        images = self.prepare(images)

        def fn(batch):
            return jit_explain(self.generator, self.classifier, batch, self.settings)

        p = self.map_batches(fn, images, batch_size, desc="explain")
        sites = list(self.classifier.site_channels)  # jit returns them sorted by name
        p = p.replace(**{f: {s: getattr(p, f)[s] for s in sites} for f in SITE_FIELDS})
        return jax.tree.map(jnp.asarray, p)

    def saliency_fn(self, site: str) -> Callable:
        """A jitted ``fn(images) -> (cam_full, cam_pathway, grad)`` at gate site `site`
        (`saliency.pathway_saliency`), compiled once per site."""
        sites = self.classifier.site_channels
        if site not in sites:
            raise ValueError(f"site {site!r} is not a gate site of this classifier: {list(sites)}")
        if site not in self._saliency_fns:
            jitted = jax.jit(saliency_lib.pathway_saliency, static_argnums=4)
            self._saliency_fns[site] = lambda images: jitted(
                self.generator, self.classifier, images, self.settings, site
            )
        return self._saliency_fns[site]

    def saliency(
        self, images, site: str | None = None, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grad-CAM of the explained class on the full and on the pathway model, and the
        pathway gradient (`gencnp_jax.eval.saliency`), in padded batches as `__call__`.

        Args:
          images: as for `__call__` (uint8 pixels, or floats normalised as the classifier was
            trained).
          site: the gate site whose activation Grad-CAM weighs (4-D, NxHxWxC, or a square grid
            of tokens); None takes the deepest site.
          batch_size: rows per call; default the explainer's.

        Returns:
          ``(cam_full f32[N, H, W], cam_pathway f32[N, H, W], grad f32[N, H, W, C])`` as host
          numpy: the maps of the class each pathway explains (the prediction), each Grad-CAM
          divided by its per-image maximum; the gradient of that class's logit w.r.t. the
          input through the pathway-gated model.

        Raises:
          ValueError: `site` is not a gate site of the classifier; images as in `prepare`.
        """
        fn = self.saliency_fn(site or list(self.classifier.site_channels)[-1])
        return self.map_batches(fn, self.prepare(images), batch_size, desc="saliency")

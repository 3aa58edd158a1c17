"""Default config: Fashion-MNIST, VGG-style classifier, GEN-CNP generator.

    python launch.py --config=configs/default.py --workdir=runs/default --mode=all

Every field says what it does and what it accepts. This file is the one source of every
default: constructors take their hyper-parameters as required arguments, and a run's recorded
config (``WORKDIR/config.json``) is merged over these defaults when it is read back. Measured
results live in README.md and docs/RESULTS.md, with their commit.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # int: every random draw of the run (batches, initial weights, tie-breaks)
    c.num_devices = 0  # int >= 0: devices of the data mesh; 0 = every visible device (all hosts)
    c.cpu_devices = 2  # int >= 0: XLA host devices when on CPU (one per core); 0 = XLA's default

    c.data = ml_collections.ConfigDict()
    # "fashion_mnist" (our offline TFDS builder) | a stock TFDS name prepared in data_dir |
    # "npz:DIR" ({train,test}.npz) | "folder:DIR" ({train,test}/CLASS/*.png)
    c.data.dataset = "fashion_mnist"
    c.data.data_dir = "~/tensorflow_datasets"  # path: TFDS data dir
    c.data.manual_dir = "/usr/share/datasets/fashion-mnist"  # path: Fashion-MNIST IDX files
    c.data.train_limit = 0  # int >= 0: first N training images only (0 = all)
    # int >= 0: training images held out (seeded) as the validation split, never trained on:
    # every choice is made on it, the test split only reports
    c.data.validation_size = 5000
    c.data.test_limit = 0  # int >= 0: first N test images only (0 = all)
    # uint8 pixels x -> the classifier's input: "dataset" = (x/255 - mean) / std with the
    # dataset's channel statistics (known, or computed on its training split) | "none" = x/255
    # in [0, 1] | "MEAN,...:STD,..." = (x/255 - MEAN) / STD, one value or one per channel
    c.data.normalization = "dataset"

    c.train = ml_collections.ConfigDict()  # what both trainers (classifier, generator) share
    c.train.batch_size = 128  # int > 0, a multiple of the devices: images per step
    c.train.eval_batch_size = 500  # int > 0, a multiple of the devices: images per eval pass
    c.train.checkpoint_every = 250  # int > 0: steps between checkpoints (a run resumes there)
    c.train.log_every = 50  # int > 0: steps between logged metrics
    c.train.grad_clip = 1.0  # float > 0: global-norm gradient clipping

    c.classifier = ml_collections.ConfigDict()
    c.classifier.name = "vgg"  # "vgg" | "resnet": the built-in classifier trained here
    c.classifier.widths = (32, 64, 128, 128)  # ints > 0: channels per stage
    c.classifier.depth = 1  # int > 0: convs per VGG stage / blocks per ResNet stage
    c.classifier.epochs = 4.0  # float > 0: passes over the training split
    c.classifier.learning_rate = 3e-3  # float > 0: AdamW peak rate (warm-up, cosine decay)
    c.classifier.weight_decay = 1e-4  # float >= 0: AdamW's
    c.classifier.warmup_steps = 100  # int >= 0: linear warm-up of the rate
    # Your own model instead of `name` (README, docs/ATTACH.md): "package.module:function"
    # returning a Flax NNX module or a Linen (module, variables) pair, called with
    # `factory_kwargs`; its weights from `checkpoint` (.npz / .msgpack / orbax directory, as
    # gencnp_jax.save_weights writes them); gated at the modules whose paths match `sites`
    # (glob patterns; gencnp_jax.list_sites lists them). Such a model is imported, not trained.
    c.classifier.factory = ""
    c.classifier.factory_kwargs = ml_collections.ConfigDict()
    c.classifier.checkpoint = ""
    c.classifier.sites = ()

    c.generator = ml_collections.ConfigDict()
    c.generator.ablation = "mean"  # "mean" | "zero": what a closed gate leaves (METHOD.md §2)
    c.generator.steps = 1000  # int > 0: training steps
    c.generator.learning_rate = 3e-3  # float > 0: Adam peak rate (warm-up, cosine decay)
    c.generator.warmup_steps = 50  # int >= 0
    c.generator.stats_examples = 5000  # int > 0: training images of the channel evidence's stats
    c.generator.model = ml_collections.ConfigDict()  # Generator(..., **c.generator.model)
    c.generator.model.hidden = 128  # int > 0: D, every embedding and state
    c.generator.model.cell = "gru"  # "gru" | "lstm" | "mlp": RFE and RPD's recurrent cell
    c.generator.model.pooling = ("avg", "max")  # subset of ("avg", "max"): each site's pools
    c.generator.model.init_open = 0.7  # float in (0, 1): every gate's initial score
    # bool: also read each channel's first-order effect on the predicted class (one backward
    # pass per explanation; method/evidence.py)
    c.generator.model.grad_evidence = True
    c.generator.daq = ml_collections.ConfigDict()  # distance-aware quantization (METHOD.md §3)
    c.generator.daq.temperature = 2.0  # float > 0: T
    c.generator.daq.sigma = 2.0  # float > 0: the Gaussian kernel's width
    c.generator.loss = ml_collections.ConfigDict()  # METHOD.md §4: a weight 0 removes the term
    c.generator.loss.tau = 2.0  # float > 0: distillation temperature
    c.generator.loss.w_kd = 1.0  # float >= 0: KL(p || p~) (faithfulness)
    c.generator.loss.w_hinge = 5.0  # float >= 0: top-1 hinge, capped at the full model's margin
    c.generator.loss.hinge_margin = 1.0  # float >= 0
    # float >= 0: mean of DAQ's soft gates (the density). 10 over 12 and 8, chosen on validation
    # (docs/RESULTS.md, "The gate head"): own mDC 26.1 -> 23.4, density 0.276 -> 0.288,
    # agreement and leakage kept (0.993, 0.047)
    c.generator.loss.w_sparsity = 10.0
    c.generator.loss.sparsity_ramp_steps = 200  # int >= 0: linear ramp of w_sparsity from 0
    c.generator.loss.w_pdn = 0.1  # float >= 0: PDN head distilled from the classifier
    c.generator.loss.w_leak = 8.0  # float >= 0: leakage hinge on another class's image
    c.generator.loss.leak_margin = 1.0  # float >= 0: also the PIO targets' leakage margin
    c.generator.loss.w_distill = 20.0  # float >= 0: BCE to the PIO targets (0: none computed)
    # float >= 0: ListNet of a rank head of its own to the PIO logits' order (the ranking at
    # fixed densities; 0, or no PIO targets: no rank head, the gate logits rank). 50 over 20
    # chosen on validation with the teacher below (docs/RESULTS.md; a small margin)
    c.generator.loss.w_rank = 50.0
    # Fixed-density faithfulness of the ranking: x gated with the top fraction of its own
    # ranking, the fraction spread over `ranked_density`, must keep the prediction. It trains
    # the rank head only (the gate head and its own density keep their terms). 5 over 0 and 10,
    # chosen on validation (docs/RESULTS.md): mDC at 0.1 81.6 -> 76.6, at 0.3 2.9 -> 3.3
    c.generator.loss.w_ranked = 5.0  # float >= 0: KL of those masks
    c.generator.loss.ranked_density = (0.05, 0.4)  # (low, high), 0 < low <= high < 1
    # Per-instance optimised (PIO) masks of training images, the `w_distill` targets
    # (method/pio.py; cached in WORKDIR/generator/pio_targets)
    c.generator.pio = ml_collections.ConfigDict()
    c.generator.pio.num_images = 1024  # int >= 0: training images given a PIO mask
    c.generator.pio.per_step = 64  # int > 0, a multiple of the devices: targets per step
    c.generator.pio.batch_size = 256  # int > 0, a multiple of the devices: images optimised
    c.generator.pio.steps = 150  # int > 0: Adam steps per image
    # float > 0. 0.2 with density_weight 4 (chosen on validation, docs/RESULTS.md): a teacher
    # whose ranking loses less at the fixed densities than 0.1 with 2 did
    c.generator.pio.learning_rate = 0.2
    c.generator.pio.density_weight = 4.0  # float >= 0: mean gate against KL(p || p(x; mask))
    c.generator.pio.leak_weight = 1.0  # float >= 0: leakage hinge on another class's image
    # float >= 0: each mask trimmed to the sparsest faithful prefix of its ranking
    # (KL <= budget, no leak); 0 = off
    c.generator.pio.trim_kl_budget = 0.2
    c.generator.pio.target_temperature = 1.0  # float >= 0: 0 = 0/1 targets, T: sigmoid(logit/T)

    c.bank = ml_collections.ConfigDict()  # class pathways (METHOD.md §5)
    c.bank.samples_per_class = 50  # int > 0: j
    # float in [0, 1]: rho, F_c >= rho keeps a neuron. 0.37 (kept by 19 or more of 50
    # samples): on validation images (scripts/validation_read.py), of the thresholds whose
    # class pathways leak at most 0.06, the one that keeps the prediction most often
    # (docs/RESULTS.md), for the generator of `w_sparsity` 10
    c.bank.threshold = 0.37
    c.bank.class_source = "prediction"  # "prediction" | "label": a sample's class

    c.eval = ml_collections.ConfigDict()  # METHOD.md §6-7
    c.eval.num_examples = 1000  # int >= 0: the common test subset (0 = the whole split)
    c.eval.densities = (0.05, 0.1, 0.2, 0.3)  # floats in (0, 1): fixed densities
    c.eval.ablations = ("mean", "zero")  # subset of ("mean", "zero"); the first: headline
    c.eval.batch_size = 250  # int > 0, a multiple of the devices
    c.eval.control_examples = 500  # int > 0: training images of every method's class means
    c.eval.sanity_steps = 300  # int > 0: generator steps on the weight-randomised classifier
    c.eval.sanity_pio_images = 256  # int >= 0: its PIO masks (at most)
    c.eval.cdrp_steps = 30  # int >= 0: CDRP's SGD steps (cdrp-detect: 30)
    c.eval.cdrp_gamma = 0.05  # float >= 0: CDRP's L1 weight (cdrp-detect: 0.05)
    c.eval.cdrp_lr = 0.1  # float > 0: CDRP's SGD rate (cdrp-detect: 0.1)
    c.eval.intgrad_steps = 11  # int >= 2: NeuronIntGrad's points (PathwayGrad: 11)
    c.eval.auc_examples = 500  # int >= 0: deletion / insertion AUCs on the first N (0 = all)
    c.eval.gradcam_site = ""  # a gate site, or "" = the deepest: the report's Grad-CAM
    # The references (stages/references.py; --mode=headroom alone): the best class and
    # per-image masks our searches find, yardsticks beside every method
    c.eval.reference_examples = 256  # int > 0: test images of the instance reference
    c.eval.reference_steps = 50  # int >= 0: Adam steps of each search (0: their starts)

    c.bench = ml_collections.ConfigDict()  # --mode=bench
    c.bench.repeats = 15  # int > 0: timed calls per number (CDRP: at most 3)
    c.bench.batch_size = 256  # int > 0, a multiple of the devices: images per timed call

    c.explain = ml_collections.ConfigDict()  # --mode=explain
    c.explain.images = ""  # "npz:FILE" | "folder:DIR" | a path; "" = the first 16 test images
    return c

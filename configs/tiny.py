"""Tiny config for tests and smoke runs: small widths, few steps, capped data.

python launch.py --config=configs/tiny.py --workdir=/tmp/tiny --mode=all
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.train_limit = 576  # 512 training images beside 64 validation ones
    c.data.test_limit = 128
    c.data.validation_size = 64
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.checkpoint_every = 8
    c.train.log_every = 4
    c.classifier.widths = (8, 16, 16, 16)
    c.classifier.epochs = 2.0
    c.classifier.warmup_steps = 4
    c.generator.model.hidden = 16
    c.generator.steps = 24
    c.generator.warmup_steps = 4
    c.generator.learning_rate = 2e-2  # few steps: move fast enough to sparsify
    c.generator.loss.sparsity_ramp_steps = 8
    c.generator.pio.num_images = 64
    c.generator.pio.per_step = 16
    c.generator.pio.batch_size = 32
    c.generator.pio.steps = 10
    c.generator.pio.learning_rate = 0.5  # 10 steps of 0.5 can close a gate that starts at 3
    c.bank.samples_per_class = 4
    c.eval.num_examples = 64
    c.eval.control_examples = 64
    c.eval.sanity_steps = 8
    c.eval.auc_examples = 32
    c.eval.batch_size = 32
    c.eval.cdrp_steps = 5
    c.eval.intgrad_steps = 4
    c.eval.reference_examples = 32
    c.eval.reference_steps = 4
    c.bench.repeats = 2
    c.bench.batch_size = 32
    return c

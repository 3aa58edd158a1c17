"""The ranked experiment: the ResNet config with the fixed-density ranking terms on.

    python launch.py --config=configs/resnet_ranked.py --workdir=runs/resnet_ranked --mode=all

`generator.loss.w_ranked` trains the score *ranking* that the fixed-density evaluation reads:
x gated with the top fraction of its own scores (a fraction drawn from `ranked_density` per
row) must keep the prediction. Measured at commit 34fb99b (README of that commit; mean
ablation): on the ResNet, GEN-CNP's mDC at densities 0.1 / 0.2 was 6.0 / 3.9 on 500 common
test images (CDRP 34.7 / 12.7, the other baselines >= 86), while one mask per class from its
own mean scores reached 1.8 / 0.4. On the default VGG the same weight gave mDC 79.3 / 41.8
(CDRP 81.1 / 42.2), its own class mask 78.9 / 42.2, and at its own density (0.20) it leaked
0.24: not the default.
"""

from configs import resnet


def get_config():
    c = resnet.get_config()
    c.generator.loss.w_ranked = 5.0
    return c

"""ResNet-style variant of the default config (basic blocks with skip connections).

python launch.py --config=configs/resnet.py --workdir=runs/resnet --mode=train_classifier
"""

from configs import default


def get_config():
    c = default.get_config()
    c.classifier.name = "resnet"
    c.classifier.widths = (32, 64, 128)
    c.classifier.depth = 1
    return c

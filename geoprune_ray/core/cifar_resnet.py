"""The paper's CIFAR ResNets, built on torchvision's (imported here only: torchvision costs a process about 1.3 s of
CPU to import, which every Ray worker of a run that needs no torchvision model would pay)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from .models import _scaled

__all__ = ["CifarResNet", "tv_resnet"]


class CifarResNet(tv_resnet.ResNet):
    """torchvision's ResNet with the CIFAR stem (3×3 stride-1 conv, no max-pool) and a width multiplier."""

    def __init__(self, block, layers, num_classes: int, in_channels: int = 3, width: float = 1.0):
        self._width = width
        super().__init__(block, layers, num_classes=num_classes)
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.Identity()
        self.fc = nn.Linear(_scaled(512, width) * block.expansion, num_classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage reads the (scaled) stem, not torchvision's fixed 64
            self.inplanes = _scaled(64, self._width)
        return super()._make_layer(block, _scaled(planes, self._width), blocks, stride, dilate)

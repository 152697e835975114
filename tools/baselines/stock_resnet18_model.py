"""The model file a stock TorchServe archive of ``resnet18`` names: TorchServe's ``BaseHandler`` wants exactly one
class defined in it, and the example's file defines two (its block and the network); the network comes in beside
it as an extra file, as TorchServe's own ResNet examples subclass torchvision's."""

from resnet18 import ResNet18


class StockResNet18(ResNet18):
    pass

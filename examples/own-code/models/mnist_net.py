"""pytorch/examples' MNIST `Net`, as the most copied PyTorch example writes it (two
convolutions, max-pooling, dropout, two linear layers, `log_softmax` out), sized for the
1×8×8 digits of `mydata.MyDataset` instead of 28×28 MNIST. It trains with `F.nll_loss`,
`Adadelta(lr=1.0)` and `StepLR(step_size=1, gamma=0.7)` stepped every epoch: configs/mnist.yaml
says so to trainyard, `train_by_hand.py` runs the same recipe in a plain loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(256, 128)  # (9216 for 28×28 MNIST)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)

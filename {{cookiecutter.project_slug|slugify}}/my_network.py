"""Your own network: the MLP of a PyTorch tutorial, unchanged (README, "Bring your own network").

configs/my_network.yaml trains it on the shipped digits (8x8 pixels: input_size 64, 10 classes):
    python train.py fit --config configs/my_network.yaml
The project flattens the images for it (its first layer is an nn.Linear), normalises them with
the training data's statistics, and trains, logs, checkpoints, tests and exports it like its own.
"""

from torch import nn


class MLP(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))

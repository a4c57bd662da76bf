import torch
from torch import nn

from prunekit.layers.targets import find_targets
from prunekit.training import SoftThreshold
from prunekit.zoo.mnist import load_mnist
from prunekit.zoo.snn import LIF, SpikingCNN


def test_lif_spikes_and_surrogate_gradient():
    x = torch.full((4, 1, 3), 1.5, requires_grad=True)  # T=4 steps of constant current
    s = LIF(tau=2.0)(x)
    assert set(s.unique().tolist()) <= {0.0, 1.0} and s.sum() > 0
    s.sum().backward()
    assert x.grad.abs().sum() > 0  # the Heaviside step alone would give zero


def test_s_lats_prunes_a_spiking_cnn_unchanged():
    torch.manual_seed(0)
    x, y = load_mnist("train")
    x, y = x[:512], y[:512]
    model = SpikingCNN(width=4, T=2)
    assert list(find_targets(model)) == ["conv1", "conv2"]  # the classifier and BN are not pruned
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = 32
    pruner = SoftThreshold(model, opt, total_steps=steps, schedule="s_lats", final_threshold=0.08)
    losses = []
    for k in range(steps):
        i = (k * 64) % 512
        loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        losses.append(loss.item())
    assert pruner.threshold == 0.08 and pruner.sparsity() > 0.2
    assert sum(losses[-4:]) < sum(losses[:4])
    pruner.finalize()
    assert float((model.conv2.weight == 0).float().mean()) > 0.2

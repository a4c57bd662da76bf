"""Channel surgery: removing channels whose producers output zero changes nothing; undo is exact."""
import torch

from prunekit.structures.channel_surgery import shrink_channels
from prunekit.structures.channels_graph import find_channel_groups
from prunekit.structures.surgery import Undo
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from tests.helpers.cnn_toys import ConcatSE, same, silence, snapshot

X = torch.randn(3, 1, 28, 28)


def test_mobilenet_channels_that_output_zero_leave_without_a_trace():
    torch.manual_seed(0)
    model = mobilenet_v1_mnist().eval()
    graph = find_channel_groups(model, X)
    removed = {g: [0, grp.count - 1] for g, grp in enumerate(graph.groups)}
    silence(model, graph, removed)
    before, snap = model(X), snapshot(model)
    undo = Undo()
    shrink_channels(model, graph, removed, undo)
    assert model[1][0].groups == model[1][0].out_channels == 6 and model[1][1].num_features == 6
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(snap)
    undo.restore()
    assert same(model, snap) and model[1][0].groups == 8


def test_concat_offsets_and_flattened_columns():
    torch.manual_seed(0)
    model = ConcatSE().eval()
    with torch.no_grad():
        model.bn.running_mean.zero_()
    graph = find_channel_groups(model, X)
    removed = {g: [1] for g in range(len(graph.groups))}
    silence(model, graph, removed)
    before = model(X)
    shrink_channels(model, graph, removed, Undo())
    assert (model.a.out_channels, model.b.out_channels, model.bn.num_features) == (2, 4, 6)
    assert model.fc.in_features == 5 * 49 and model.se_reduce.out_channels == 3
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)

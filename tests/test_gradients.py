import pytest
import torch
from torch.func import functional_call, grad, vmap

from byzflower.models import build_model
from clients.gradients import ModelGradients


def _reference_per_sample(model, x, inputs, targets):
    """Per-sample gradients by torch.func on the whole model, flattened in parameter order."""
    G = ModelGradients(model, inputs.shape[1:])
    params = G.unflatten(x)

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    rows = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([rows[n].reshape(len(inputs), -1) for n in G.names], dim=1)


@pytest.mark.parametrize("name", ["mlp", "mlp-notebook", "cnn"])
def test_factored_per_sample_gradients_are_exact(name):
    torch.manual_seed(0)
    model = build_model(name, seed=5).double()
    G = ModelGradients(model, (1, 28, 28))
    x = G.initial_point()
    inputs, targets = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    ref = _reference_per_sample(model, x, inputs, targets)
    sg = G.sample_grads(x, inputs, targets)
    eye = torch.eye(6, dtype=torch.float64)  # one group per sample, weight 1: the rows themselves
    rows = G.combine(sg, eye.diagonal()[:, None].expand(6, 1).contiguous())
    assert torch.allclose(rows, ref, atol=1e-12, rtol=1e-10)
    # group sums with weights, and the plain autograd mean gradient
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, -1.0]], dtype=torch.float64)
    got = G.combine(sg, w)
    assert torch.allclose(got[0], 0.5 * ref[0] + 0.25 * ref[1] + 0.25 * ref[2], atol=1e-12)
    assert torch.allclose(got[1], ref[3] - ref[5], atol=1e-12)
    assert torch.allclose(G.mean_grad(x, inputs, targets), ref.mean(0), atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "mlp-notebook", "cnn"])
def test_combined_differences_equal_the_difference_of_exact_gradients(name):
    model = build_model(name, seed=2).double()
    G = ModelGradients(model, (1, 28, 28))
    x_old = G.initial_point()
    x_new = x_old + 0.05 * torch.randn(x_old.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs, targets = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    diff = _reference_per_sample(model, x_new, inputs, targets) - _reference_per_sample(model, x_old, inputs, targets)
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, -2.0]], dtype=torch.float64)
    got = G.combine_difference(G.sample_grads(x_new, inputs, targets), G.sample_grads(x_old, inputs, targets), w)
    assert torch.allclose(got[0], 0.5 * diff[0] + 0.25 * diff[1] + 0.25 * diff[2], atol=1e-12)
    assert torch.allclose(got[1], diff[3] - 2.0 * diff[5], atol=1e-12)
    assert got.abs().max() > 1e-3  # the two points really differ


def test_mlp_layers_are_factored_and_the_first_input_is_the_data():
    G = ModelGradients(build_model("mlp", 1), (1, 28, 28))
    assert G.dim == 39_760 and G.dense_dim == 0  # the paper's network, all nn.Linear
    assert G.input_is_data == [True, False]
    C = ModelGradients(build_model("cnn", 1), (1, 28, 28))
    assert 0 < C.dense_dim < C.dim  # conv parameters fall back to dense rows


def test_flatten_roundtrip_and_evaluate():
    model = build_model("mlp", 2)
    G = ModelGradients(model, (1, 28, 28))
    x = G.initial_point()
    assert torch.equal(G.flatten(G.unflatten(x)), x)
    inputs, targets = torch.randn(30, 1, 28, 28), torch.randint(0, 10, (30,))
    loss, acc = G.evaluate(x, inputs, targets, batch=7)
    with torch.no_grad():
        out = model(inputs)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, targets)), rel=1e-5)
    assert acc == pytest.approx(float((out.argmax(1) == targets).float().mean()))


def test_models_are_seeded():
    a, b, c = (ModelGradients(build_model("mlp", s), (1, 28, 28)).initial_point() for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="choose one of: mlp, mlp-notebook, cnn"):
        build_model("resnet", 1)


def test_the_notebook_network_is_the_double_softmax_one():
    """tanh on the input, softmax outputs, cross-entropy on them: the loss is bounded below by
    ln(e + 9) - 1 (reached by a one-hot output), the signature of the authors' recorded runs."""
    import math

    model = build_model("mlp-notebook", 1)
    G = ModelGradients(model, (1, 28, 28))
    assert G.dim == 39_760 and G.input_is_data == [False, False]  # the first layer sees tanh(x)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        plain = build_model("mlp", 1)
        plain.load_state_dict(model.state_dict())
        want = torch.softmax(plain(torch.tanh(x)), dim=1)
    assert torch.allclose(out.sum(1), torch.ones(5)) and torch.allclose(out, want, atol=1e-6)
    one_hot = torch.eye(10)[:1]
    floor = float(torch.nn.functional.cross_entropy(one_hot, torch.tensor([0])))
    assert floor == pytest.approx(math.log(math.e + 9) - 1, rel=1e-6)


class _Doubled(torch.nn.Module):
    """One Linear layer on the data whose output is changed in place afterwards: not closed-form."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(22, 2)

    def forward(self, x):
        out = self.linear(x)
        return out.mul_(2.0)


@pytest.mark.parametrize("shape,classes", [((22,), 2), ((1, 28, 28), 10)])
def test_logistic_regression_skips_autograd_with_autograds_numbers(shape, classes):
    """logreg's output gradient is formed in closed form (softmax - one-hot) by autograd's own
    kernel: bit for bit what autograd gives, including far from the optimum (saturated softmax)."""
    G = ModelGradients(build_model("logreg", 1, shape, classes), shape)
    assert G._closed_form
    gen = torch.Generator().manual_seed(3)
    x = G.initial_point() + torch.randn(G.dim, generator=gen)
    inputs = torch.randn(300, *shape, generator=gen) * 30.0
    targets = torch.randint(0, classes, (300,), generator=gen)
    fast = G.sample_grads(x, inputs, targets)
    G._closed_form = False
    slow = G.sample_grads(x, inputs, targets)
    assert torch.equal(fast.deltas[0], slow.deltas[0]) and torch.equal(fast.inputs[0], slow.inputs[0])
    assert fast.deltas[0].abs().max() > 0.99  # saturated samples are in the test


def test_closed_form_only_where_the_model_is_one_linear_layer_with_cross_entropy():
    assert not ModelGradients(build_model("mlp", 1), (1, 28, 28))._closed_form
    assert not ModelGradients(_Doubled(), (22,))._closed_form  # same pointer, other values

    def other_loss(logits, target, reduction="mean"):
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)

    assert not ModelGradients(build_model("logreg", 1, (22,), 2), (22,), loss=other_loss)._closed_form


def _all_dense_model() -> torch.nn.Module:
    """A conv-only network (no nn.Linear: every parameter dense)."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 10, 28), torch.nn.Flatten())


@pytest.mark.parametrize("name", ["cnn", "all-dense"])
def test_group_gradients_equal_the_weighted_sums_of_per_sample_gradients(name):
    """SGD-type estimators take the dense parameters' group sums from one gradient per group of the
    group's weighted loss instead of per-sample rows: the same sums (float64, to rounding), the
    factored layers' part the very same numbers."""
    model = (build_model("cnn", seed=4) if name == "cnn" else _all_dense_model()).double()
    G = ModelGradients(model, (1, 28, 28))
    gen = torch.Generator().manual_seed(2)
    x_old = G.initial_point()
    x_new = x_old + 0.05 * torch.randn(x_old.shape, dtype=torch.float64, generator=gen)
    inputs = torch.randn(12, 1, 28, 28, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 10, (12,), generator=gen)
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, -2.0], [0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    new, old = G.sample_grads(x_new, inputs, targets), G.sample_grads(x_old, inputs, targets)
    assert new.dense is not None and G.sample_grads(x_new, inputs, targets, dense=False).dense is None

    sums = G.dense_group_sums(x_new, inputs, targets, w)
    assert sums.shape == (4, G.dense_dim) and sums.abs().max() > 1e-3
    assert torch.allclose(sums, G.combine(new, w)[:, G.dense_index], atol=1e-12, rtol=1e-10)
    assert torch.equal(sums[2], torch.zeros(G.dense_dim, dtype=torch.float64))  # weights 0: nothing

    got, ref = G.group_grads(x_new, inputs, targets, w), G.combine(new, w)
    factored = torch.ones(G.dim, dtype=torch.bool)
    factored[G.dense_index] = False
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)
    assert torch.equal(got[:, factored], ref[:, factored])
    got = G.group_grad_differences(x_new, x_old, inputs, targets, w)
    assert torch.allclose(got, G.combine_difference(new, old, w), atol=1e-12, rtol=1e-10)
    assert got.abs().max() > 1e-3  # the two points really differ
    # a full local gradient over a count of samples that leaves its last block padded
    many = torch.randn(45, 1, 28, 28, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 10, (45,), generator=gen)
    each = torch.full((45,), 1 / 45, dtype=torch.float64)
    summed = G.weighted_sum_at(x_new, many, labels, each)
    assert torch.allclose(summed, G.weighted_sum(G.sample_grads(x_new, many, labels), each), atol=1e-12, rtol=1e-10)
    assert torch.allclose(summed, G.mean_grad(x_new, many, labels), atol=1e-12, rtol=1e-10)


def test_with_one_sample_per_worker_group_gradients_are_the_per_sample_rows_bit_for_bit():
    """SGD with b = 1 (the paper's) keeps its numbers: a group of one sample is that sample."""
    G = ModelGradients(build_model("cnn", seed=6), (1, 28, 28))
    gen = torch.Generator().manual_seed(5)
    inputs, targets = torch.randn(25, 1, 28, 28, generator=gen), torch.randint(0, 10, (25,), generator=gen)
    w = torch.ones(25, 1)
    x = G.initial_point()
    assert torch.equal(G.group_grads(x, inputs, targets, w), G.combine(G.sample_grads(x, inputs, targets), w))

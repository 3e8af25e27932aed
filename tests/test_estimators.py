import pytest
import torch

from byzflower.models import build_model
from clients.estimators import SGD
from clients.gradients import ModelGradients
from clients.rng import _MASK64, derive_seed, uniform_ints
from clients.workers import CHUNK, WorkerData, chunks, take


def _splitmix_ref(z):
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def test_uniform_ints_match_a_plain_python_splitmix():
    seed, counter, count = 7, 3, 4
    streams = torch.tensor([0, 5, 123456789])
    high = torch.tensor([10, 1000, 3])
    got = uniform_ints(seed, streams, counter, count, high)
    base = derive_seed(seed, "uniform-ints", counter)
    mix1 = 0xBF58476D1CE4E5B9
    for i, s in enumerate(streams.tolist()):
        z0 = _splitmix_ref(base ^ ((s * mix1) & _MASK64))
        for j in range(count):
            z = _splitmix_ref((z0 + j * 0x9E3779B97F4A7C15) & _MASK64)
            assert got[i, j] == ((z >> 11) * high[i].item()) >> 53


def test_uniform_ints_are_in_range_and_uniform():
    draws = uniform_ints(1, torch.arange(200), 9, 500, torch.full((200,), 7))
    assert draws.min() == 0 and draws.max() == 6
    freq = torch.bincount(draws.reshape(-1), minlength=7).double() / draws.numel()
    assert (freq - 1 / 7).abs().max() < 0.005  # 100,000 draws
    assert not torch.equal(draws, uniform_ints(1, torch.arange(200), 10, 500, torch.full((200,), 7)))


def test_take_gathers_what_indexing_gathers_for_any_shape_of_rows():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(40, 1, 3, 3, generator=gen)
    for shape in [(7,), (5, 3), (2, 3, 4), (0,), (0, 5)]:
        rows = torch.randint(0, 40, shape, generator=gen)
        got = take(table, rows)
        assert got.shape == (*shape, 1, 3, 3) and torch.equal(got, table[rows])
    data = WorkerData.shared([0, 1], table, torch.arange(40), [torch.tensor([3, 9, 9]), torch.tensor([0, 39])])
    rows = torch.tensor([[0, 2], [4, 3]])
    assert torch.equal(data.input_rows(rows), table[data.source[rows]])  # partitioner='full': rows -> samples


def _group(G, parts, ids):
    return WorkerData.from_parts(ids, [parts[i] for i in ids])


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    G = ModelGradients(build_model("mlp", 1), (1, 28, 28))
    parts = [(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))) for n in torch.randint(15, 40, (23,)).tolist()]
    return G, parts


def test_sgd_message_is_the_mean_gradient_of_the_sampled_batch_plus_weight_decay(setting):
    G, parts = setting
    est = SGD(G, _group(G, parts, list(range(23))), batch_size=4, weight_decay=0.01, seed=2)
    x = G.initial_point()
    msgs = est.step(x, iteration=5)
    rows = est.sample_rows(5)
    for i in (0, 7, 22):
        ref = G.mean_grad(x, est.data.inputs[rows[i]], est.data.targets[rows[i]]) + 0.01 * x
        assert torch.allclose(msgs[i], ref, atol=1e-6)
    # rows are the worker's own samples
    assert bool(((rows >= est.data.offsets[:-1, None]) & (rows < est.data.offsets[1:, None])).all())


@pytest.mark.parametrize("name", ["sgd", "saga", "svrg", "sarah", "momentum"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_messages_do_not_depend_on_how_workers_are_grouped(setting, name, model):
    """K = 1, K = 2 and one group of all workers give bit-identical messages (the cnn's dense
    parameters: per-sample rows for SAGA's table, one gradient per worker for the others)."""
    from clients.estimators import ESTIMATORS

    G, parts = setting
    k = 23
    if model == "cnn":  # fewer workers: a conv net's gradients cost more
        G, parts, k = ModelGradients(build_model("cnn", 1), (1, 28, 28)), parts[:6], 6
    kwargs = {"snapshot_interval": 2} if name == "svrg" else {"restart_interval": 3} if name == "sarah" else {}

    def make(ids):
        return ESTIMATORS[name](G, _group(G, parts, list(ids)), batch_size=3, seed=4, **kwargs)

    x = G.initial_point()
    full, singles = make(range(k)), [make([i]) for i in range(k)]
    halves = [make(range(0, k // 2)), make(range(k // 2, k))]
    for t in (1, 2, 3, 4):
        m = full.step(x, t)
        assert torch.equal(m, torch.cat([h.step(x, t) for h in halves]))
        assert torch.equal(m, torch.cat([s.step(x, t) for s in singles]))
        x = x - 0.1 * m.mean(0)


def test_chunks_are_aligned_on_worker_ids():
    ids = [CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]
    got = list(chunks(torch.tensor(ids)))
    assert [c.valid.sum().item() for c in got] == [2, 2, 1]
    assert got[0].rows.tolist()[CHUNK - 2 :] == [0, 1] and got[0].targets.tolist() == [0, 1]
    assert all(len(c.rows) == CHUNK for c in got) and all(c.span is None for c in got)
    (full,) = chunks(torch.arange(CHUNK, 2 * CHUNK))
    assert full.span == (0, CHUNK) and bool(full.valid.all())


def test_bad_estimator_arguments(setting):
    G, parts = setting
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SGD(G, _group(G, parts, [0]), batch_size=0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        SGD(G, _group(G, parts, [0]), batch_size=1, weight_decay=-1)


@pytest.mark.parametrize("name", ["sgd", "saga", "svrg", "sarah"])
@pytest.mark.parametrize("model", ["mlp", "mlp-notebook", "cnn", "logreg"])
def test_messages_do_not_depend_on_the_thread_count(name, model):
    """A Ray actor may get 1 or 2 CPUs, a sweep's run a share of the cores: the numbers must not change
    with torch's thread count (mlp-notebook's softmax backward sums by the thread count on a CPU)."""
    from clients.estimators import ESTIMATORS

    gen = torch.Generator().manual_seed(1)
    G = ModelGradients(build_model(model, 1), (1, 28, 28))
    parts = [(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in (600, 40)]
    kwargs = {"snapshot_interval": 2} if name == "svrg" else {"restart_interval": 3} if name == "sarah" else {}
    runs = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            est = ESTIMATORS[name](G, _group(G, parts, [0, 1]), batch_size=3, seed=6, **kwargs)
            x, msgs = G.initial_point(), []
            for t in range(1, 5):
                msgs.append(est.step(x, t))
                x = x - 0.1 * msgs[-1].mean(0)
            runs.append(torch.stack(msgs))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(runs[0], runs[1])


def test_worker_momentum_is_the_running_average_of_sgd_messages_and_resumes_exactly(setting):
    from clients.estimators import Momentum

    G, parts = setting
    ids = list(range(6))
    kw = dict(batch_size=3, weight_decay=0.01, seed=4)

    def momentum():
        return Momentum(G, _group(G, parts, ids), beta=0.8, **kw)

    sgd, mom = SGD(G, _group(G, parts, ids), **kw), momentum()
    x0 = G.initial_point()
    points = {t: x0 + 0.01 * t * torch.randn(G.dim, generator=torch.Generator().manual_seed(t)) for t in range(1, 6)}
    expected, sent = None, {}
    for t, x in points.items():
        g = sgd.step(x, t)
        expected = g.clone() if expected is None else 0.8 * expected + 0.2 * g  # m_1 = g_1
        sent[t] = mom.step(x, t)
        assert torch.allclose(sent[t], expected, atol=1e-6), t
        if t == 3:
            saved = mom.state_dict()
    resumed = momentum()
    resumed.load_state_dict(saved)
    assert all(torch.equal(resumed.step(points[t], t), sent[t]) for t in (4, 5))
    assert not torch.allclose(momentum().step(points[4], 4), sent[4])  # the state is what carries the past
    with pytest.raises(ValueError, match="beta must be in"):
        Momentum(G, _group(G, parts, ids), beta=1.0, **kw)


def test_worker_momentum_is_an_optimizer_from_run_config():
    from byzflower.config import ConfigError, resolve

    cfg = resolve({"optimizer": "momentum", "momentum-beta": 0.5})
    assert (cfg.lr, cfg.batch_size) == (0.1, 5)
    with pytest.raises(ConfigError, match="momentum-beta"):
        resolve({"optimizer": "momentum", "momentum-beta": 1.0})


@pytest.mark.parametrize("batch_size", [1, 5, 300])
def test_draws_made_ahead_on_the_cpu_are_the_per_iteration_draws(batch_size):
    """On the CPU sample rows are drawn for blocks of iterations at once: the same rows as drawn one
    iteration at a time (the GPU's way), in any order of iterations, across block edges."""
    G = ModelGradients(build_model("logreg", 0, (22,), 2), (22,))
    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(n, 22, generator=gen), torch.randint(0, 2, (n,), generator=gen)) for n in (30, 7, 100, 55)]
    data = WorkerData.from_parts([3, 5, 26, 40], parts)
    ahead, single = SGD(G, data, batch_size=batch_size, seed=4), SGD(G, data, batch_size=batch_size, seed=4)
    single._ahead = None
    x = G.initial_point()
    for t in [1, 2, 3, 300, 299, 1000, 1001, 5, 256, 257]:
        ahead.prepare(x, t)
        single.prepare(x, t)
        assert torch.equal(ahead.sample_rows(), single.sample_rows())
        assert torch.equal(ahead.sample_rows(t + 7), single.sample_rows(t + 7))
    assert ahead._ahead[1].shape[0] > 1  # really drawn ahead

import pytest

from byzflower.layout import Layout


@pytest.mark.parametrize("k", [1, 2, 3, 7, 70])
def test_nodes_host_every_worker_once(k):
    layout = Layout.last(50, 20)
    hosted = [w for p in range(k) for w in layout.node_workers(p, k)]
    assert hosted == list(range(70))


def test_two_supernodes_split_the_paper_setup():
    layout = Layout.last(50, 20)
    assert layout.node_workers(0, 2) == range(0, 35)
    assert layout.node_workers(1, 2) == range(35, 70)
    honest, byz = layout.split(layout.node_workers(1, 2))
    assert honest == list(range(35, 50)) and byz == list(range(50, 70))


def test_one_worker_per_node_when_k_equals_w():
    layout = Layout.last(5, 2)
    assert [list(layout.node_workers(p, 7)) for p in range(7)] == [[p] for p in range(7)]
    assert [layout.is_byzantine(w) for w in range(7)] == [False] * 5 + [True] * 2


def test_more_nodes_than_workers_leaves_some_empty():
    layout = Layout.last(3, 0)
    assert sum(len(layout.node_workers(p, 5)) == 0 for p in range(5)) == 2


def test_honest_ranks_skip_byzantine_ids():
    layout = Layout(4, byzantine_ids=(1, 3))
    assert layout.honest_ids == (0, 2, 4, 5)
    assert [layout.honest_rank(w) for w in layout.honest_ids] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"partition-id 5 is outside 0\.\.4"):
        layout.node_workers(5, 5)

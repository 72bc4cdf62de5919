import pytest

from llava_platform.data.batching import length_grouped_batches


def rows(n):
    return [{"i": i, "has_image": i % 3 != 0, "length": (i * 37) % 101} for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 7, 64, 250])
def test_every_row_once(n):
    got = [r["i"] for b in length_grouped_batches(rows(n), batch_size=4, group_batches=3, seed=1) for r in b]
    assert sorted(got) == list(range(n))


def test_batches_are_single_modality_and_length_sorted_except_the_tail():
    batches = list(length_grouped_batches(rows(240), batch_size=4, group_batches=5, seed=0))
    assert all(len(b) == 4 for b in batches)
    body = batches[:-2]
    for b in body:
        assert len({r["has_image"] for r in b}) == 1
        lengths = [r["length"] for r in b]
        assert lengths == sorted(lengths, reverse=True)


def test_grouping_reduces_padding():
    data = rows(400)
    plain = [data[i : i + 8] for i in range(0, 400, 8)]
    grouped = list(length_grouped_batches(data, batch_size=8, group_batches=10))

    def padding(batches):
        return sum(max(r["length"] for r in b) * len(b) - sum(r["length"] for r in b) for b in batches)

    assert padding(grouped) < padding(plain) / 2


def test_drop_last_and_validation():
    assert all(len(b) == 4 for b in length_grouped_batches(rows(10), 4, 2, drop_last=True))
    with pytest.raises(ValueError):
        list(length_grouped_batches(rows(3), 0))

"""BatchState: rows join with left padding and leave with their cache rows (pure tensor logic)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from worker.engine.batchstate import BatchState


def state(lengths: list[int], width: int, first: int, images: int) -> BatchState:
    """Rows whose cache holds ``first``, ``first``+1, ... at their real (left-padded) slots."""
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    keys = torch.zeros(len(lengths), 2, width, 4)
    for row, n in enumerate(lengths):
        keys[row, :, width - n:] = first + row
    layer = SimpleNamespace(keys=keys, values=keys.clone())
    return BatchState(cache=SimpleNamespace(layers=[layer]), mask=mask,
                      last=torch.tensor([[7]] * len(lengths)),
                      next_pos=torch.tensor(lengths), rope_axes=3,
                      extras={"image_mask": mask[:, :, None].repeat(1, 1, images)},
                      per_row={"hidden": torch.ones(len(lengths), images, 3)})


def test_join_left_pads_both_sides_and_keep_drops_rows_and_unused_columns() -> None:
    running, joining = state([2, 3], 3, first=1, images=1), state([5], 5, first=10, images=2)
    running.join(joining)
    assert running.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = running.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 4) and keys[2, 0, :, 0].tolist() == [10.0] * 5
    assert keys[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1]
    assert running.extras["image_mask"].shape == (3, 5, 2)
    assert running.extras["image_mask"][0, :, 1].tolist() == [0] * 5  # no second image
    assert running.per_row["hidden"].shape == (3, 2, 3)
    step = running.decode_inputs()
    assert step["attention_mask"].shape == (3, 6)
    assert step["position_ids"].shape == (3, 3, 1)
    assert step["position_ids"][:, 2, 0].tolist() == [5, 5, 5]
    assert step["image_mask"].shape == (3, 1, 2) and step["hidden"].shape == (3, 2, 3)
    layer = running.cache.layers[0]  # the forward appends each row's new token to the cache
    layer.keys = torch.cat([layer.keys, torch.full((3, 2, 1, 4), 9.0)], dim=2)
    layer.values = layer.keys.clone()
    running.advance(step["attention_mask"], torch.tensor([4, 5, 6]))
    assert running.last.view(-1).tolist() == [4, 5, 6] and running.next_pos.tolist() == [3, 4, 6]
    running.keep([0, 1])  # the long row leaves: two leading columns are nobody's any more
    assert running.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert running.cache.layers[0].keys.shape == (2, 2, 4, 4)
    assert running.extras["image_mask"].shape == (2, 4, 2)
    assert running.per_row["hidden"].shape == (2, 2, 3)
    assert running.tokens() == 8


def test_each_step_mask_is_the_last_one_and_a_real_column_past_rows_joining_and_leaving() -> None:
    running = state([2, 3], 3, first=1, images=1)
    expected = running.mask.tolist()
    for step in range(150):  # past the spare columns, rows leaving and joining on the way
        if step == 70:
            running.keep([1])
            expected = [expected[1]]
            while not any(row[0] for row in expected):
                expected = [row[1:] for row in expected]
        if step == 100:
            running.join(state([1], 1, first=5, images=1))
            width = len(expected[0])
            expected += [[0] * (width - 1) + [1]]
        mask = running.decode_inputs()["attention_mask"]
        expected = [row + [1] for row in expected]
        assert mask.tolist() == expected, step
        layer = running.cache.layers[0]
        layer.keys = torch.cat([layer.keys, layer.keys[:, :, -1:]], dim=2)
        layer.values = layer.keys.clone()
        running.advance(mask, torch.ones(running.rows, dtype=torch.long))

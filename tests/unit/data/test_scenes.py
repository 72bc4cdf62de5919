"""Scenes: the world's variety (kinds, colours, cells, sizes, backgrounds, image shapes) and pixels
drawn where the scene says."""

from llava_platform.data import scenes


def test_world_variety():
    import random

    rng = random.Random(0)
    drawn = [scenes.random_scene(rng) for _ in range(400)]
    shapes = [s for sc in drawn for s in sc.shapes]
    assert len({s.kind for s in shapes}) >= 5 and len({s.colour for s in shapes}) >= 6
    assert {len(sc.shapes) for sc in drawn} == {1, 2, 3}
    assert len({s.position for s in shapes}) == 9 and {s.size for s in shapes} == {"small", "large"}
    assert len({sc.background for sc in drawn}) >= 3
    assert len({(sc.width, sc.height) for sc in drawn}) > 1
    for sc in drawn:
        cells = [(s.row, s.col) for s in sc.shapes]
        assert len(cells) == len(set(cells))


def test_rendered_colour_is_where_the_scene_says():
    scene = scenes.Scene((scenes.Shape("square", "blue", "large", 0, 2),), "white", 120, 120, ((0.0, 0.0),))
    img = scenes.render(scene)
    assert img.getpixel((100, 20)) == scenes.COLOURS["blue"]  # centre of the top-right cell
    assert img.getpixel((20, 100)) == scenes.BACKGROUNDS["white"]

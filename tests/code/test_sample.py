"""The embedded synthetic data: deterministic rendering, generation and recipe validation."""

import pytest

from cleanmessy import sample
from cleanmessy.errors import UserError


def test_render_is_deterministic():
    """Same (label, index, size, seed) gives byte-identical pixels."""
    a = sample.render("messy", 3, size=48, seed=1)
    b = sample.render("messy", 3, size=48, seed=1)
    assert a.tobytes() == b.tobytes()


def test_render_differs_by_index_label_and_seed():
    """Changing the index, the label or the seed changes the picture."""
    base = sample.render("clean", 0, size=48).tobytes()
    assert sample.render("clean", 1, size=48).tobytes() != base
    assert sample.render("messy", 0, size=48).tobytes() != base
    assert sample.render("clean", 0, size=48, seed=9).tobytes() != base


@pytest.mark.parametrize("size", [48, 57])
def test_render_size(size):
    """render returns an RGB image of the requested side."""
    img = sample.render("clean", 0, size=size)
    assert img.size == (size, size) and img.mode == "RGB"


def test_render_rejects_unknown_label():
    """Only the known classes can be rendered."""
    with pytest.raises(ValueError):
        sample.render("tidy", 0)


def test_generate_yields_both_classes():
    """generate yields per_class items for each of clean and messy, with matching paths."""
    items = list(sample.generate(sample.Recipe(per_class=3, size=48, seed=0)))
    assert len(items) == 6
    labels = [label for _, label, _ in items]
    assert labels.count("clean") == 3 and labels.count("messy") == 3
    assert all(rel.startswith(f"{label}/") and rel.endswith(".png") for rel, label, _ in items)
    assert len({rel for rel, _, _ in items}) == 6
    assert all(img.size == (48, 48) for _, _, img in items)


def test_generate_at_small_allowed_sizes():
    """Every picture renders at the small sizes read_recipe accepts (32..44; the pillow once crashed below 43)."""
    for size in range(32, 45):
        items = list(sample.generate(sample.Recipe(per_class=10, size=size, seed=0)))
        assert len(items) == 20 and all(img.size == (size, size) for _, _, img in items)


def write_recipe(folder, text):
    (folder / sample.RECIPE_FILE).write_text(text)
    return folder


def test_read_recipe_values(tmp_path):
    """A valid recipe is read; missing keys take defaults."""
    r = sample.read_recipe(write_recipe(tmp_path, "per_class: 4\nsize: 40\n"))
    assert r == sample.Recipe(per_class=4, size=40, seed=0)
    assert sample.is_recipe(tmp_path)


def test_read_recipe_unknown_key(tmp_path):
    """An unknown key is a UserError naming it."""
    with pytest.raises(UserError, match="unknown key colour"):
        sample.read_recipe(write_recipe(tmp_path, "per_class: 4\ncolour: red\n"))


def test_read_recipe_size_too_small(tmp_path):
    """size below 32 is a UserError."""
    with pytest.raises(UserError, match="size"):
        sample.read_recipe(write_recipe(tmp_path, "size: 31\n"))


def test_read_recipe_per_class_positive(tmp_path):
    """per_class: 0 is a UserError."""
    with pytest.raises(UserError, match="per_class"):
        sample.read_recipe(write_recipe(tmp_path, "per_class: 0\n"))

"""Your own data: CSVDataModule (a table) and ImageFolderDataModule (a folder per class)."""

import pytest
import torch
from PIL import Image

from {{ cookiecutter.package_name }}.data import CSVDataModule, ImageFolderDataModule
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models.nets import Normalize

# --- CSV -------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")
    return path


def csv_module(path, **kwargs) -> CSVDataModule:
    dm = CSVDataModule(path=str(path), **kwargs)
    dm.setup("fit")
    return dm


def numbered_rows(n: int, labels) -> list[list]:
    """Rows `id, id * 10, label`: the first feature tells which row a sample came from."""
    return [[i, i * 10, labels[i % len(labels)]] for i in range(n)]


def all_samples(dm) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of all three splits, concatenated."""
    parts = [dm.splits[s] for s in ("train", "val", "test")]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def test_csv_string_labels_are_sorted(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "ten", "label"], numbered_rows(30, ["cat", "ant", "bee"]))
    dm = csv_module(path)
    assert dm.class_names == ["ant", "bee", "cat"]
    assert dm.num_classes == 3
    assert dm.input_shape == (2,)
    x, y = all_samples(dm)
    expected = {"cat": 2, "ant": 0, "bee": 1}
    for row_id, label in zip(x[:, 0].long().tolist(), y.tolist()):
        assert label == expected[["cat", "ant", "bee"][row_id % 3]]
    assert torch.equal(x[:, 1], x[:, 0] * 10)


def test_csv_integer_labels_sort_numerically(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "ten", "label"], numbered_rows(30, ["10", "2", "1"]))
    dm = csv_module(path)
    assert dm.class_names == ["1", "2", "10"]
    x, y = all_samples(dm)
    for row_id, label in zip(x[:, 0].long().tolist(), y.tolist()):
        assert dm.class_names[label] == ["10", "2", "1"][row_id % 3]


def test_csv_feature_columns_subset_in_given_order(tmp_path):
    header = ["id", "name", "ten", "label"]
    rows = [[i, f"row{i}", i * 10, "ab"[i % 2]] for i in range(20)]
    path = write_csv(tmp_path / "t.csv", header, rows)
    dm = csv_module(path, feature_columns=["ten", "id"])  # "name" is text, but not used
    assert dm.input_shape == (2,)
    x, _ = all_samples(dm)
    assert torch.equal(x[:, 0], x[:, 1] * 10)
    assert sorted(x[:, 1].long().tolist()) == list(range(20))


def test_csv_label_column_option_and_bom(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("species,width\nx,1\ny,2\nx,3\ny,4\nx,5\n", encoding="utf-8-sig")
    dm = csv_module(path, label_column="species", val_fraction=0.2, test_fraction=0.2)
    assert dm.class_names == ["x", "y"]
    assert dm.input_shape == (1,)


@pytest.mark.parametrize("val, test", [(0.2, 0.1), (0.0, 0.25), (0.5, 0.0)])
def test_csv_fraction_split_sizes(tmp_path, val, test):
    path = write_csv(tmp_path / "t.csv", ["id", "ten", "label"], numbered_rows(100, ["a", "b"]))
    dm = csv_module(path, val_fraction=val, test_fraction=test)
    sizes = {s: len(dm.splits[s][1]) for s in ("train", "val", "test")}
    n_val, n_test = round(100 * val), round(100 * test)
    assert sizes == {"train": 100 - n_val - n_test, "val": n_val, "test": n_test}
    x, _ = all_samples(dm)
    assert sorted(x[:, 0].long().tolist()) == list(range(100))  # every row in exactly one split


def test_csv_split_depends_on_seed(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "ten", "label"], numbered_rows(50, ["a", "b"]))

    def val_ids(seed):
        return csv_module(path, seed=seed).splits["val"][0][:, 0].tolist()

    assert val_ids(1) == val_ids(1)
    assert sorted(val_ids(1)) != sorted(val_ids(2))


def test_csv_folder_with_given_splits(tmp_path):
    folder = tmp_path / "table"
    write_csv(folder / "train.csv", ["id", "ten", "label"], numbered_rows(12, ["a", "b"]))
    write_csv(folder / "val.csv", ["id", "ten", "label"], [[100, 1000, "b"], [101, 1010, "c"]])
    write_csv(folder / "test.csv", ["id", "ten", "label"], [[200, 2000, "a"], [201, 2010, "b"], [202, 2020, "a"]])
    dm = csv_module(folder, val_fraction=0.5, test_fraction=0.3)  # fractions unused: the files decide
    assert dm.class_names == ["a", "b", "c"]  # from all files
    assert {s: len(dm.splits[s][1]) for s in ("train", "val", "test")} == {"train": 12, "val": 2, "test": 3}
    assert dm.splits["val"][0][:, 0].tolist() == [100, 101]
    assert dm.splits["val"][1].tolist() == [1, 2]
    assert dm.splits["test"][0][:, 0].tolist() == [200, 201, 202]
    assert sorted(dm.splits["train"][0][:, 0].long().tolist()) == list(range(12))


def test_csv_folder_without_test_file_cuts_test_from_train(tmp_path):
    folder = tmp_path / "table"
    write_csv(folder / "train.csv", ["id", "ten", "label"], numbered_rows(40, ["a", "b"]))
    write_csv(folder / "val.csv", ["id", "ten", "label"], [[100, 1000, "a"], [101, 1010, "b"]])
    dm = csv_module(folder, test_fraction=0.25)
    assert {s: len(dm.splits[s][1]) for s in ("train", "val", "test")} == {"train": 30, "val": 2, "test": 10}


def test_csv_features_are_standardised_by_the_model(tmp_path):
    """Batches hold the raw values; the model's Normalize, given the data's statistics, standardises them."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(200, generator=g) * 500 + 3000
    small = torch.rand(200, generator=g) * 0.01
    rows = [[f"{b:.3f}", f"{s:.6f}", "ab"[i % 2]] for i, (b, s) in enumerate(zip(big.tolist(), small.tolist()))]
    dm = csv_module(write_csv(tmp_path / "t.csv", ["big", "small", "label"], rows), batch_size=32)
    xs = []
    for batch in dm.train_dataloader():
        x, y = dm.on_after_batch_transfer(batch, 0)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        xs.append(x)
    raw = torch.cat(xs)
    assert raw.shape == (len(dm.splits["train"][1]), 2)
    assert torch.equal(raw.sort(0).values, dm.splits["train"][0].sort(0).values)  # not scaled by the data
    assert dm.mean.shape == dm.std.shape == (2,)
    torch.testing.assert_close(dm.mean, raw.mean(0))
    torch.testing.assert_close(dm.std, raw.std(0))
    normalize = Normalize((2,))
    normalize.set_statistics(dm.mean, dm.std)
    x = normalize(raw)
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(2), atol=1e-3, rtol=0)


def csv_error(tmp_path, text: str, name: str = "t.csv", **kwargs) -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as err:
        CSVDataModule(path=str(path), **kwargs).setup("fit")
    message = str(err.value)
    assert str(path) in message
    return message


def test_csv_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(UserError) as err:
        CSVDataModule(path=str(path)).setup("fit")
    assert str(path) in str(err.value) and "not found" in str(err.value)
    assert "--data.path" in str(err.value)


def test_csv_folder_without_train_file(tmp_path):
    write_csv(tmp_path / "table" / "val.csv", ["a", "label"], [[1, "x"], [2, "y"]])
    with pytest.raises(UserError) as err:
        CSVDataModule(path=str(tmp_path / "table")).setup("fit")
    assert "no train.csv" in str(err.value) and str(tmp_path / "table") in str(err.value)


def test_csv_missing_label_column(tmp_path):
    message = csv_error(tmp_path, "width,height,kind\n1,2,a\n3,4,b\n")
    assert "no label column 'label'" in message
    assert "['width', 'height', 'kind']" in message
    assert "--data.label_column" in message


def test_csv_missing_feature_column(tmp_path):
    message = csv_error(tmp_path, "a,b,label\n1,2,x\n3,4,y\n", feature_columns=["a", "c"])
    assert "['c']" in message and "not found" in message and "['a', 'b', 'label']" in message


def test_csv_text_in_a_feature_column(tmp_path):
    message = csv_error(tmp_path, "a,b,label\n1,2,x\n3,4,y\n5,five,x\n7,8,y\n")
    assert "t.csv:4:" in message
    assert "column 'b'" in message and "'five'" in message


def test_csv_line_numbers_count_blank_lines(tmp_path):
    message = csv_error(tmp_path, "a,label\n1,x\n\n2,y\nfoo,x\n")
    assert "t.csv:5:" in message and "'foo'" in message


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", ""])
def test_csv_non_finite_or_empty_value(tmp_path, value):
    message = csv_error(tmp_path, f"a,b,label\n1,2,x\n3,{value},y\n")
    assert "t.csv:3:" in message and "column 'b'" in message and "not a finite number" in message


def test_csv_short_row(tmp_path):
    message = csv_error(tmp_path, "a,b,label\n1,2,x\n3\n")
    assert "t.csv:3:" in message


@pytest.mark.parametrize("label", ["", "   "])
def test_csv_empty_label(tmp_path, label):
    message = csv_error(tmp_path, f"a,label\n1,x\n2,y\n3,{label}\n")
    assert "t.csv:4:" in message and "label is empty" in message


def test_csv_single_class(tmp_path):
    message = csv_error(tmp_path, "a,label\n1,x\n2,x\n3,x\n")
    assert "1 class" in message and "['x']" in message and "at least two" in message


def test_csv_header_only(tmp_path):
    message = csv_error(tmp_path, "a,b,label\n")
    assert "header but no rows" in message


def test_csv_empty_file(tmp_path):
    message = csv_error(tmp_path, "")
    assert "no label column" in message


def test_csv_not_utf8(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("a,label\n1,café\n2,thé\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        CSVDataModule(path=str(path)).setup("fit")
    assert str(path) in str(err.value) and "UTF-8" in str(err.value)


@pytest.mark.parametrize("val, test", [(1.0, 0.0), (-0.1, 0.1), (0.6, 0.4), (0.1, 1.5)])
def test_bad_fractions(tmp_path, val, test):
    with pytest.raises(UserError) as err:
        CSVDataModule(path=str(tmp_path / "t.csv"), val_fraction=val, test_fraction=test)
    assert f"val_fraction={val}, test_fraction={test}" in str(err.value)


# --- image folders ---------------------------------------------------------------------------

COLOURS = {"apple": (200, 30, 30), "lime": (40, 210, 40), "plum": (90, 20, 160)}


def write_pngs(root, per_class: int = 5, size=(8, 8), classes=COLOURS, mode: str = "RGB"):
    """root/<class>/<i>.png: a solid colour per class, the blue channel (or grey level) shifted by i."""
    for name, (r, g, b) in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (r, g, b + i) if mode == "RGB" else r + i
            Image.new(mode, size, colour).save(root / name / f"{i}.png")
    return root


def image_module(root, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), **kwargs)
    dm.setup("fit")
    return dm


def test_images_rgb_default(tmp_path):
    dm = image_module(write_pngs(tmp_path / "img", per_class=10), val_fraction=0.2, test_fraction=0.1)
    assert dm.class_names == ["apple", "lime", "plum"]
    assert dm.num_classes == 3
    assert dm.input_shape == (3, 8, 8)
    assert {s: len(dm.splits[s][1]) for s in ("train", "val", "test")} == {"train": 21, "val": 6, "test": 3}
    x, y = all_samples(dm)
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 8, 8)
    for image, label in zip(x, y.tolist()):
        r, g, b = COLOURS[dm.class_names[label]]
        assert image[0].eq(r).all() and image[1].eq(g).all()
        assert b <= int(image[2, 0, 0]) < b + 10 and image[2].eq(image[2, 0, 0]).all()
    blues = sorted(int(image[2, 0, 0]) for image, label in zip(x, y.tolist()) if label == 0)
    assert blues == [30 + i for i in range(10)]  # each image exactly once


def test_images_grayscale(tmp_path):
    dm = image_module(write_pngs(tmp_path / "img"), grayscale=True)
    assert dm.input_shape == (1, 8, 8)
    x, y = all_samples(dm)
    expected = Image.new("RGB", (1, 1), COLOURS["apple"]).convert("L").getpixel((0, 0))
    assert x[y == 0][:, :, 0, 0].min().item() == expected


def test_images_are_resized(tmp_path):
    root = write_pngs(tmp_path / "img", size=(8, 8))
    dm = image_module(root, image_size=(6, 10))  # [height, width]
    assert dm.input_shape == (3, 6, 10)
    assert all_samples(dm)[0].shape[1:] == (3, 6, 10)


def test_images_per_channel_normalisation(tmp_path):
    dm = image_module(write_pngs(tmp_path / "img", per_class=10))
    pixels, y = dm.on_after_batch_transfer(dm.splits["train"], 0)
    assert pixels.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(pixels, dm.splits["train"][0].float() / 255)  # the model is given pixels in [0, 1]
    assert dm.mean.shape == dm.std.shape == (3, 1, 1)
    normalize = Normalize((3, 6, 10))
    normalize.set_statistics(dm.mean, dm.std)
    x = normalize(pixels)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_images_given_splits(tmp_path):
    root = tmp_path / "img"
    write_pngs(root / "train", per_class=4)
    write_pngs(root / "val", per_class=2)
    write_pngs(root / "test", per_class=3)
    dm = image_module(root, val_fraction=0.5)
    assert {s: len(dm.splits[s][1]) for s in ("train", "val", "test")} == {"train": 12, "val": 6, "test": 9}
    assert dm.splits["test"][1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dm.class_names == ["apple", "lime", "plum"]


def test_images_train_folder_only_cuts_val_and_test(tmp_path):
    write_pngs(tmp_path / "img" / "train", per_class=10)
    dm = image_module(tmp_path / "img", val_fraction=0.1, test_fraction=0.2)
    assert {s: len(dm.splits[s][1]) for s in ("train", "val", "test")} == {"train": 21, "val": 3, "test": 6}


def test_images_mixed_sizes_need_image_size(tmp_path):
    root = write_pngs(tmp_path / "img", size=(8, 8))
    Image.new("RGB", (12, 10), (1, 2, 3)).save(root / "lime" / "big.png")
    with pytest.raises(UserError) as err:
        image_module(root)
    message = str(err.value)
    assert str(root / "lime" / "big.png") in message
    assert "12x10" in message and "8x8" in message
    assert "--data.image_size='[8, 8]'" in message
    assert image_module(root, image_size=(8, 8)).input_shape == (3, 8, 8)


def test_images_mixed_modes_load(tmp_path):
    root = tmp_path / "img"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    Image.new("L", (8, 8), 100).save(root / "a" / "grey.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "a" / "rgb.png")
    Image.new("RGBA", (8, 8), (40, 50, 60, 128)).save(root / "b" / "rgba.png")
    Image.new("P", (8, 8), 3).save(root / "b" / "palette.png")
    Image.new("RGB", (8, 8), (70, 80, 90)).save(root / "b" / "photo.JPG", quality=100)
    rgb = ImageFolderDataModule(root=str(root))
    x, y = rgb.samples[0]["train"]
    assert x.shape == (5, 3, 8, 8) and y.tolist() == [0, 0, 1, 1, 1]
    assert x[0, :, 0, 0].tolist() == [100, 100, 100]  # grey.png
    assert x[1, :, 0, 0].tolist() == [10, 20, 30]  # rgb.png
    assert x[4, :, 0, 0].tolist() == [40, 50, 60]  # rgba.png: the colour, alpha dropped
    grey = ImageFolderDataModule(root=str(root), grayscale=True)
    assert grey.input_shape == (1, 8, 8)
    assert grey.samples[0]["train"][0][0, 0, 0, 0].item() == 100


def test_images_ignore_hidden_folders_and_other_files(tmp_path):
    root = write_pngs(tmp_path / "img", per_class=3)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("about these images")
    dm = image_module(root)
    assert dm.class_names == ["apple", "lime", "plum"]
    assert len(all_samples(dm)[1]) == 9


def image_error(root, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        ImageFolderDataModule(root=str(root), **kwargs).setup("fit")
    return str(err.value)


def test_images_empty_class_folder(tmp_path):
    root = write_pngs(tmp_path / "img")
    (root / "pear").mkdir()
    (root / "pear" / "list.txt").write_text("no images here")
    message = image_error(root)
    assert str(root / "pear") in message and "no images" in message


def test_images_unreadable_image(tmp_path):
    root = write_pngs(tmp_path / "img")
    bad = root / "lime" / "broken.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    message = image_error(root)
    assert str(bad) in message and "not a readable image" in message


def test_images_truncated_png(tmp_path):
    root = write_pngs(tmp_path / "img")
    cut = root / "plum" / "cut.png"
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).resize((8, 8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    message = image_error(root)
    assert str(cut) in message and "not a readable image" in message


def test_images_single_class(tmp_path):
    root = write_pngs(tmp_path / "img", classes={"only": (1, 2, 3)})
    message = image_error(root)
    assert str(root) in message and "1 class" in message and "at least two" in message


def test_images_missing_root(tmp_path):
    message = image_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "not found" in message and "--data.root" in message


def test_images_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    message = image_error(root)
    assert str(root) in message and "no class folders" in message

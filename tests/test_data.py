"""Tests of the CIFAR-10 loader, the train/validation/test splits, the directory search
and the offline digits. They run on fake CIFAR-10 files written into tmp_path, except the
checks on a real copy, which are skipped when no copy is found."""
import io
import pickle
import warnings

import numpy as np
import pytest

from bnnorm.data import (
    CIFAR10_DIRNAME,
    CIFAR10_META_FILE,
    DIGITS_NUM_IMAGES,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    UnsafePickleError,
    find_cifar10_dir,
    get_cifar10_data,
    get_digits_data,
    load_cifar10,
    write_fake_cifar10,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


def write_batch(path, data, labels, key_type="bytes"):
    key = (lambda s: s.encode()) if key_type == "bytes" else (lambda s: s)
    path.write_bytes(pickle.dumps({key("data"): data, key("labels"): labels}, protocol=2))


@pytest.fixture
def fake_dir(tmp_path):
    """A fake CIFAR-10 directory with 5 training batches and a test batch of 4 images each."""
    return write_fake_cifar10(tmp_path / CIFAR10_DIRNAME, num_per_batch=4, seed=3)


# load_cifar10 ------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["bytes", "str"])
def test_load_cifar10_key_styles(tmp_path, key_type):
    root = write_fake_cifar10(tmp_path / key_type, num_per_batch=4, key_type=key_type, seed=5)
    X_train, y_train, X_test, y_test, class_names = load_cifar10(root)

    assert X_train.shape == (20, 32, 32, 3)
    assert X_test.shape == (4, 32, 32, 3)
    assert X_train.dtype == np.uint8
    assert y_train.dtype == np.int64
    assert y_test.shape == (4,)
    assert class_names == CIFAR10_CLASSES
    assert all(isinstance(name, str) for name in class_names)


def test_load_cifar10_key_styles_agree(tmp_path):
    from_bytes = load_cifar10(write_fake_cifar10(tmp_path / "b", key_type="bytes", seed=9))
    from_str = load_cifar10(write_fake_cifar10(tmp_path / "s", key_type="str", seed=9))
    for a, b in zip(from_bytes[:4], from_str[:4]):
        np.testing.assert_array_equal(a, b)


def test_load_cifar10_pixel_layout(tmp_path):
    root = write_fake_cifar10(tmp_path / CIFAR10_DIRNAME, num_per_batch=2)
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 251
    write_batch(root / "test_batch", data.astype(np.uint8), [3, 7])
    _, _, X_test, y_test, _ = load_cifar10(root)

    for i, h, w, c in [(0, 0, 0, 0), (1, 31, 31, 2), (0, 4, 17, 1), (1, 30, 2, 0)]:
        assert X_test[i, h, w, c] == data[i, 1024 * c + 32 * h + w]
    np.testing.assert_array_equal(y_test, [3, 7])


def test_load_cifar10_train_batch_order(tmp_path):
    root = write_fake_cifar10(tmp_path / CIFAR10_DIRNAME, num_per_batch=2)
    for k in range(1, 6):
        write_batch(root / f"data_batch_{k}", np.full((2, 3072), k, np.uint8), [k, k])
    X_train, y_train, _, _, _ = load_cifar10(root)
    np.testing.assert_array_equal(y_train, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    np.testing.assert_array_equal(X_train[:, 0, 0, 0], y_train)


def test_missing_dir_names_path_and_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "--download" in message
    assert "download_cifar10()" in message
    assert "$BNNORM_CIFAR10_DIR" in message


def test_missing_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path)
    with pytest.raises(DatasetError):
        load_cifar10(tmp_path)


def test_parent_dir_suggests_nested(tmp_path):
    write_fake_cifar10(tmp_path / CIFAR10_DIRNAME)
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    assert f"It contains {tmp_path / CIFAR10_DIRNAME}, so pass that" in str(info.value)


@pytest.mark.parametrize("name", ["data_batch_1", "data_batch_5", "test_batch", CIFAR10_META_FILE])
def test_missing_file_is_named(fake_dir, name):
    (fake_dir / name).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(fake_dir)
    assert name in str(info.value)
    assert str(fake_dir) in str(info.value)


@pytest.mark.parametrize("name", ["data_batch_2", "test_batch", CIFAR10_META_FILE])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.01, 0.5, 0.99])
def test_truncated_file_is_named(fake_dir, name, keep_fraction):
    content = (fake_dir / name).read_bytes()
    (fake_dir / name).write_bytes(content[:int(len(content) * keep_fraction)])
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert str(fake_dir / name) in str(info.value)
    assert "truncated" in str(info.value)


def test_not_a_pickle_is_named(fake_dir):
    (fake_dir / "data_batch_4").write_text("<html>Not Found</html>")
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert str(fake_dir / "data_batch_4") in str(info.value)


def test_pickle_of_list_is_rejected(fake_dir):
    (fake_dir / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert "contains a list" in str(info.value)


@pytest.mark.parametrize("data, found", [
    (np.zeros((4, 3000), np.uint8), "(4, 3000)"),
    (np.zeros((4, 3, 32, 32), np.uint8), "(4, 3, 32, 32)"),
    (np.zeros((4, 3072), np.float32), "float32"),
])
def test_wrong_data_shape_names_file(fake_dir, data, found):
    write_batch(fake_dir / "data_batch_3", data, [0, 1, 2, 3])
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    message = str(info.value)
    assert str(fake_dir / "data_batch_3") in message
    assert found in message
    assert "(N, 3072)" in message


def test_label_count_mismatch(fake_dir):
    write_batch(fake_dir / "test_batch", np.zeros((4, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert "'labels' has shape (3,)" in str(info.value)
    assert "expected 4 integers" in str(info.value)


def test_label_out_of_range(fake_dir):
    write_batch(fake_dir / "data_batch_1", np.zeros((4, 3072), np.uint8), [0, 1, 10, 3])
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert "labels range from 0 to 10" in str(info.value)


def test_missing_data_key(fake_dir):
    (fake_dir / "data_batch_1").write_bytes(pickle.dumps({b"labels": [1]}, protocol=2))
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert "no 'data' entry" in str(info.value)


def test_wrong_class_count(fake_dir):
    meta = {b"label_names": [b"cat", b"dog"]}
    (fake_dir / CIFAR10_META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DatasetFormatError) as info:
        load_cifar10(fake_dir)
    assert "expected a list of the 10 CIFAR-10 class names" in str(info.value)


# get_cifar10_data --------------------------------------------------------------------------

def test_splits_shapes_and_types(fake_dir):
    data = get_cifar10_data(fake_dir, num_training=12, num_validation=6, num_test=3)
    assert data["X_train"].shape == (12, 3, 32, 32)
    assert data["X_val"].shape == (6, 3, 32, 32)
    assert data["X_test"].shape == (3, 3, 32, 32)
    for key in ("X_train", "X_val", "X_test"):
        assert data[key].dtype == np.float32
        assert data[key].flags["C_CONTIGUOUS"]
    for key in ("y_train", "y_val", "y_test"):
        assert data[key].dtype == np.int64
    assert data["class_names"] == CIFAR10_CLASSES


def test_validation_is_last_training_images(fake_dir):
    X_all, y_all, X_test, y_test, _ = load_cifar10(fake_dir)
    data = get_cifar10_data(fake_dir, num_training=5, num_validation=6, num_test=3,
                            subtract_mean=False)
    np.testing.assert_array_equal(data["X_val"], X_all[-6:].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data["y_val"], y_all[-6:])
    np.testing.assert_array_equal(data["X_train"], X_all[:5].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data["y_test"], y_test[:3])


def test_validation_independent_of_training_size(fake_dir):
    small = get_cifar10_data(fake_dir, num_training=2, num_validation=4, subtract_mean=False,
                             num_test=1)
    large = get_cifar10_data(fake_dir, num_training=16, num_validation=4, subtract_mean=False,
                             num_test=1)
    np.testing.assert_array_equal(small["X_val"], large["X_val"])


def test_training_mean_subtracted_everywhere(fake_dir):
    X_all, _, X_test, _, _ = load_cifar10(fake_dir)
    data = get_cifar10_data(fake_dir, num_training=10, num_validation=4, num_test=4,
                            dtype=np.float64)
    mean_image = X_all[:10].astype(np.float64).mean(axis=0).transpose(2, 0, 1)

    np.testing.assert_allclose(data["X_train"].mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(data["X_val"], X_all[-4:].transpose(0, 3, 1, 2) - mean_image,
                               atol=1e-10)
    np.testing.assert_allclose(data["X_test"], X_test.transpose(0, 3, 1, 2) - mean_image,
                               atol=1e-10)


def test_clipping_warns_with_sizes(fake_dir):
    with pytest.warns(UserWarning, match=r"uses 16 training \(requested 49000\)"):
        data = get_cifar10_data(fake_dir, num_validation=4)
    assert len(data["X_train"]) == 16
    assert len(data["X_val"]) == 4
    assert len(data["X_test"]) == 4


def test_clipping_test_split_warns(fake_dir):
    with pytest.warns(UserWarning, match=r"4 test images \(requested 9\)"):
        data = get_cifar10_data(fake_dir, num_training=2, num_validation=2, num_test=9)
    assert len(data["X_test"]) == 4


def test_exact_fit_does_not_warn(fake_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = get_cifar10_data(fake_dir, num_training=15, num_validation=5, num_test=4)
    assert len(data["X_train"]) == 15


def test_validation_using_all_images_raises(fake_dir):
    with pytest.raises(ValueError, match="num_validation=20 leaves no training images"):
        get_cifar10_data(fake_dir, num_validation=20)


def test_zero_validation_and_test(fake_dir):
    data = get_cifar10_data(fake_dir, num_training=3, num_validation=0, num_test=0)
    assert data["X_val"].shape == (0, 3, 32, 32)
    assert data["X_test"].shape == (0, 3, 32, 32)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_training": 0}, "num_training=0 is invalid"),
    ({"num_training": 2.5}, "num_training=2.5 is invalid"),
    ({"num_validation": -1}, "num_validation=-1 is invalid"),
    ({"num_test": True}, "num_test=True is invalid"),
    ({"dtype": np.int32}, "dtype=int32 is invalid"),
])
def test_invalid_arguments(fake_dir, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_cifar10_data(fake_dir, **kwargs)


# find_cifar10_dir --------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Unset the search variables and point the cache at an empty directory."""
    monkeypatch.delenv("BNNORM_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("BNNORM_CACHE_DIR", str(tmp_path / "empty-cache"))
    return monkeypatch


def test_find_env_var_wins(clean_env, tmp_path):
    (tmp_path / "named").mkdir()
    clean_env.setenv("BNNORM_CIFAR10_DIR", str(tmp_path / "named"))
    assert find_cifar10_dir() == tmp_path / "named"


def test_find_env_var_missing_dir(clean_env, tmp_path):
    clean_env.setenv("BNNORM_CIFAR10_DIR", str(tmp_path / "does-not-exist"))
    root = find_cifar10_dir()
    assert root == tmp_path / "does-not-exist"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(root)
    message = str(info.value)
    assert "$BNNORM_CIFAR10_DIR is set to" in message
    assert str(tmp_path / "does-not-exist") in message
    assert "../shared/data/cifar-10-batches-py" in message


def test_find_env_var_parent_folder(clean_env, tmp_path):
    nested = write_fake_cifar10(tmp_path / "parent" / CIFAR10_DIRNAME)
    clean_env.setenv("BNNORM_CIFAR10_DIR", str(tmp_path / "parent"))
    assert find_cifar10_dir() == nested


@pytest.mark.parametrize("subdir", [".", "nbs"])
def test_find_shared_beside_project(clean_env, tmp_path, subdir):
    shared = write_fake_cifar10(tmp_path / "shared" / "data" / CIFAR10_DIRNAME)
    cwd = tmp_path / "project" / subdir
    cwd.mkdir(parents=True)
    clean_env.chdir(cwd)
    assert find_cifar10_dir() == shared.resolve()


def test_find_downloaded_copy(clean_env, tmp_path):
    cached = write_fake_cifar10(tmp_path / "empty-cache" / CIFAR10_DIRNAME)
    (tmp_path / "project").mkdir()
    clean_env.chdir(tmp_path / "project")
    assert find_cifar10_dir() == cached


def test_find_returns_none(clean_env, tmp_path):
    (tmp_path / "project" / "nbs").mkdir(parents=True)
    # A directory without batches.meta is not a CIFAR-10 copy.
    (tmp_path / "shared" / "data" / CIFAR10_DIRNAME).mkdir(parents=True)
    clean_env.chdir(tmp_path / "project" / "nbs")
    assert find_cifar10_dir() is None


# real CIFAR-10, when a copy is on disk ------------------------------------------------------

def real_cifar10_dir():
    found = find_cifar10_dir()
    if found is None or not (found / CIFAR10_META_FILE).is_file():
        pytest.skip("no real CIFAR-10 directory found: set $BNNORM_CIFAR10_DIR to run this test")
    return found


def test_real_cifar10():
    root = real_cifar10_dir()
    X_train, y_train, X_test, y_test, class_names = load_cifar10(root)
    assert X_train.shape[1:] == (32, 32, 3)
    assert X_test.shape[1:] == (32, 32, 3)
    assert len(y_train) == len(X_train)
    assert len(y_test) == len(X_test)
    assert set(np.unique(y_train)) == set(range(10))
    assert class_names == CIFAR10_CLASSES

    data = get_cifar10_data(root, num_training=len(X_train) // 2, num_validation=100,
                            num_test=100)
    np.testing.assert_allclose(data["X_train"].mean(axis=0), 0, atol=1e-3)


# get_digits_data ---------------------------------------------------------------------------

def test_digits_default_splits():
    data = get_digits_data()
    assert data["X_train"].shape == (1297, 1, 8, 8)
    assert data["X_val"].shape == (250, 1, 8, 8)
    assert data["X_test"].shape == (250, 1, 8, 8)
    assert data["X_train"].dtype == np.float32
    assert data["y_test"].dtype == np.int64
    assert data["class_names"] == [str(d) for d in range(10)]
    np.testing.assert_allclose(data["X_train"].mean(axis=0), 0, atol=1e-4)


def sorted_rows(X):
    flat = X.reshape(len(X), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_splits_use_each_image_once():
    from sklearn.datasets import load_digits

    data = get_digits_data(subtract_mean=False, dtype=np.float64)
    joined = np.concatenate([data["X_train"], data["X_val"], data["X_test"]])
    labels = np.concatenate([data["y_train"], data["y_val"], data["y_test"]])
    digits = load_digits()
    np.testing.assert_array_equal(sorted_rows(joined), sorted_rows(digits.images))
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(digits.target))


def test_digits_seed_fixes_shuffle():
    first = get_digits_data(num_training=100, num_validation=20, num_test=20, seed=4)
    again = get_digits_data(num_training=100, num_validation=20, num_test=20, seed=4)
    other = get_digits_data(num_training=100, num_validation=20, num_test=20, seed=5)
    np.testing.assert_array_equal(first["X_val"], again["X_val"])
    np.testing.assert_array_equal(first["y_train"], again["y_train"])
    assert (first["y_train"] != other["y_train"]).any()


def test_digits_mean_from_training_split():
    raw = get_digits_data(num_training=50, num_validation=10, num_test=10, subtract_mean=False,
                          dtype=np.float64)
    data = get_digits_data(num_training=50, num_validation=10, num_test=10, dtype=np.float64)
    mean_image = raw["X_train"].mean(axis=0)
    np.testing.assert_allclose(data["X_test"], raw["X_test"] - mean_image, atol=1e-12)
    assert raw["X_train"].min() >= 0
    assert raw["X_train"].max() <= 16


def test_digits_too_many_images():
    with pytest.raises(ValueError, match=f"has {DIGITS_NUM_IMAGES} images.*= 1798"):
        get_digits_data(num_training=1298)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_training": 0}, "num_training=0 is invalid"),
    ({"num_test": -5}, "num_test=-5 is invalid"),
    ({"dtype": bool}, "dtype=bool is invalid"),
])
def test_digits_invalid_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_digits_data(**kwargs)


def test_digits_seed_must_be_integer():
    with pytest.raises(ValueError, match="seed='a' is invalid; expected an integer >= 0"):
        get_digits_data(seed="a")


class CreateFile:
    "An object whose pickle calls io.open(path, 'w') when it is loaded, creating the file."

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (io.open, (self.path, "w"))


@pytest.mark.parametrize("name", [CIFAR10_META_FILE, "data_batch_2"])
def test_crafted_pickle_runs_nothing(fake_dir, tmp_path, name):
    created = tmp_path / "CREATED"
    content = {b"data": CreateFile(created), b"labels": [0], b"label_names": [b"x"] * 10}
    (fake_dir / name).write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(UnsafePickleError) as info:
        load_cifar10(fake_dir)
    assert "references the Python object io.open" in str(info.value)
    assert str(fake_dir / name) in str(info.value)
    assert not created.exists()


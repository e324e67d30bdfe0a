"""Tests for branchnet.virtual.oneshot: reading runNN folders, one-shot accuracy, retrieval
metrics (against brute-force loops and pytorch-metric-learning)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from branchnet.data.dataset import DataError
from branchnet.data.omniglot import load_omniglot, make_oneshot_runs, scale_images
from branchnet.virtual.oneshot import OneShotRun, oneshot_accuracy, read_oneshot_runs, retrieval_metrics
from test_omniglot import character_image, write_omniglot


def flat(x: torch.Tensor) -> torch.Tensor:
    """The identity embedding: pixels as a vector."""
    return x.flatten(1)


def write_runs(root, n_runs=3, ways=5, size=10, shuffle_labels=False, same_images=True,
               prefix_run=True, seed=0):
    """Runs in Lake's layout; test item i shows the character of class answer[i] (the same image
    when ``same_images``). ``shuffle_labels`` writes a random permutation of the true answers."""
    rng = np.random.default_rng(seed)
    for r in range(1, n_runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        answer = rng.permutation(ways)  # item i -> class answer[i]
        for c in range(ways):
            Image.fromarray(character_image(r, c, 1, size)).save(run / "training" / f"class{c + 1:02d}.png")
        for i, c in enumerate(answer):
            img = character_image(r, c, 1 if same_images else 2, size)
            Image.fromarray(img).save(run / "test" / f"item{i + 1:02d}.png")
        labelled = rng.permutation(answer) if shuffle_labels else answer
        pre = f"run{r:02d}/" if prefix_run else ""
        lines = [f"{pre}test/item{i + 1:02d}.png {pre}training/class{c + 1:02d}.png"
                 for i, c in enumerate(labelled)]
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_identity_embedding_on_identical_images_is_perfect(tmp_path):
    runs = read_oneshot_runs(write_runs(tmp_path, n_runs=3, ways=5), image_size=None)
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    assert runs[0].train_x.shape == (5, 1, 10, 10) and runs[0].ways == 5
    assert runs[0].train_files[0] == "training/class01.png" and runs[0].test_files[-1] == "test/item05.png"
    res = oneshot_accuracy(flat, runs)
    assert res == {"accuracy": 1.0, "per_run": [1.0, 1.0, 1.0], "n_trials": 15}


def test_shuffled_labels_give_about_chance(tmp_path):
    runs = read_oneshot_runs(write_runs(tmp_path, n_runs=20, ways=20, shuffle_labels=True, seed=1),
                             image_size=None)
    res = oneshot_accuracy(flat, runs)
    assert res["n_trials"] == 400
    assert res["accuracy"] < 0.15  # chance is 1/20
    correct = read_oneshot_runs(write_runs(tmp_path / "ok", n_runs=20, ways=20, seed=1), image_size=None)
    assert oneshot_accuracy(flat, correct)["accuracy"] == 1.0


def test_drawings_by_another_drawer_and_label_paths_relative_to_the_run(tmp_path):
    runs = read_oneshot_runs(write_runs(tmp_path, same_images=False, prefix_run=False), image_size=None)
    assert oneshot_accuracy(flat, runs)["accuracy"] == 1.0  # drawers differ by a few pixels


def test_images_are_resized_and_scaled_like_training(tmp_path):
    write_runs(tmp_path, n_runs=1, ways=3, size=12)
    run = read_oneshot_runs(tmp_path, image_size=6)[0]
    assert run.train_x.shape == (3, 1, 6, 6) and run.train_x.dtype == torch.float32
    img = Image.open(tmp_path / "run01" / "training" / "class02.png")
    raw = np.asarray(img.resize((6, 6), Image.Resampling.BILINEAR))
    assert torch.equal(run.train_x[1, 0], scale_images(raw))
    assert run.train_x.min() >= -1 and run.train_x.max() <= 1


def test_runs_written_by_make_oneshot_runs_round_trip(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, {"A": 8, "B": 6}, drawers=3), image_size=None,
                      cache_dir=tmp_path / "c")
    make_oneshot_runs(s, tmp_path / "runs", n_runs=4, ways=6, seed=2)
    runs = read_oneshot_runs(tmp_path / "runs", image_size=None)
    assert len(runs) == 4 and all(r.ways == 6 for r in runs)
    # the synthetic drawers differ by a few pixels, so the identity embedding is right
    assert oneshot_accuracy(flat, runs)["accuracy"] == 1.0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_oneshot_runs(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no runNN folders in"):
        read_oneshot_runs(tmp_path / "empty")
    root = write_runs(tmp_path / "r", n_runs=3)
    (root / "run03" / "class_labels.txt").unlink()
    with pytest.raises(DataError, match=r"run03/class_labels\.txt is missing"):
        read_oneshot_runs(root)
    root = write_runs(tmp_path / "s", n_runs=2)
    (root / "run02" / "training" / "class04.png").unlink()
    with pytest.raises(DataError, match=r"line \d+ points to 'run02/training/class04.png'.*missing"):
        read_oneshot_runs(root)
    root = write_runs(tmp_path / "t", n_runs=1)
    (root / "run01" / "class_labels.txt").write_text("test/item01.png\n")
    with pytest.raises(DataError, match="line 1: expected"):
        read_oneshot_runs(root)
    (root / "run01" / "class_labels.txt").write_text("\n")
    with pytest.raises(DataError, match="no label lines"):
        read_oneshot_runs(root)
    (root / "run01" / "class_labels.txt").write_text("../x.png training/class01.png\n")
    with pytest.raises(DataError, match="unsafe path"):
        read_oneshot_runs(root)


def test_oneshot_accuracy_checks_the_embedding():
    run = OneShotRun("run01", torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]),
                     ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        oneshot_accuracy(lambda x: x.flatten(1).unsqueeze(1), [run])
    with pytest.raises(ValueError, match="at least one run"):
        oneshot_accuracy(flat, [])
    # ties go to the first training image: class 0
    assert oneshot_accuracy(flat, [run])["per_run"] == [0.5]


# --- retrieval -----------------------------------------------------------------------------


def brute_force_retrieval(emb: np.ndarray, y: np.ndarray) -> dict:
    p1, aps, maprs = [], [], []
    for q in range(len(y)):
        others = [j for j in range(len(y)) if j != q]
        ranked = sorted(others, key=lambda j: (float(np.linalg.norm(emb[q] - emb[j])), j))
        rel = [int(y[j] == y[q]) for j in ranked]
        R = sum(rel)
        if R == 0:
            continue
        prec = [sum(rel[: i + 1]) / (i + 1) for i in range(len(rel))]
        p1.append(rel[0])
        aps.append(sum(p * r for p, r in zip(prec, rel, strict=True)) / R)
        maprs.append(sum(prec[i] * rel[i] for i in range(R)) / R)
    return {"precision_at_1": np.mean(p1), "mAP": np.mean(aps), "map_at_r": np.mean(maprs),
            "n_queries": len(p1)}


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=2, max_size=25), seed=st.integers(0, 1000),
       chunk=st.integers(1, 8))
def test_retrieval_matches_brute_force(labels, seed, chunk):
    y = np.array(labels)
    if not any((y == c).sum() > 1 for c in y):
        with pytest.raises(ValueError, match="undefined"):
            retrieval_metrics(torch.zeros(len(y), 2), y)
        return
    emb = np.random.default_rng(seed).normal(size=(len(y), 3))
    got = retrieval_metrics(torch.as_tensor(emb), torch.as_tensor(y), chunk_size=chunk)
    ref = brute_force_retrieval(emb, y)
    assert got["n_queries"] == ref["n_queries"]
    for k in ("precision_at_1", "mAP", "map_at_r"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_retrieval_equals_pytorch_metric_learning():
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(0)
    emb, y = torch.randn(60, 5, generator=g), torch.randint(0, 6, (60,), generator=g)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision",
                                       "mean_average_precision_at_r"),
                              k=59, knn_func=CustomKNN(LpDistance(normalize_embeddings=False)))
    ref = calc.get_accuracy(emb, y, emb, y, ref_includes_query=True)
    got = retrieval_metrics(emb, y)
    assert got["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert got["mAP"] == pytest.approx(ref["mean_average_precision"], abs=1e-6)
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_retrieval_known_values_and_shape_errors():
    emb = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    m = retrieval_metrics(emb, torch.tensor([0, 1, 0, 1]))
    # q0: ranks 1 (1), 3 (0), 10 (1) -> rel 0 1 0; q1: 0 (0), 3 (0), 10 (1) -> 0 0 1
    # q2: 1 (1), 0 (0), 10 (1) -> 0 1 0; q3: 3 (0), 1 (1), 0 (0) -> 0 1 0
    assert m["precision_at_1"] == 0.0 and m["n_queries"] == 4
    assert m["mAP"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert m["map_at_r"] == 0.0
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        retrieval_metrics(torch.zeros(3, 2), torch.zeros(4))

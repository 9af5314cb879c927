"""Class-conditional training (issue 35): labels through the data and the train step, label
dropout, the bound given the label and given none, sample grids with a row per class, and an
unconditional run of before still loading."""
import json
import os
import shutil

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from vdm_jax.data import ArraySource, load_source
from vdm_jax.training import evaluate_bpd, generate_samples, load_checkpoint, make_mesh, train_and_evaluate
from vdm_jax.training.evaluation import check_labels
from vdm_jax.training.objective import drop_labels


@pytest.fixture(scope="session")
def conditional_run(uninterrupted):
    """(work directory, summary) of the micro run class-conditional on the digits, run once."""
    return uninterrupted("conditional")


def test_label_dropout_replaces_labels_with_no_label_at_its_rate():
    labels = jnp.arange(200_000) % 10
    for rate in (0.0, 0.1, 0.5):
        dropped = jax.jit(drop_labels, static_argnums=(1, 2))(labels, rate, 10, key=jax.random.key(0))
        kept = dropped == labels
        assert bool(jnp.all(kept | (dropped == 10)))  # a label is kept or made 'no label', nothing else
        assert abs(float(1 - kept.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / labels.size) + 1e-9


@pytest.mark.slow(25)
def test_a_conditional_run_trains_evaluates_both_bounds_and_samples_a_row_per_class(conditional_run):
    workdir, summary = conditional_run
    ev = summary["eval"]
    assert np.isfinite(ev["eval/total_bpd"]) and np.isfinite(ev["eval/unconditional_total_bpd"])
    assert ev["eval/total_bpd"] != ev["eval/unconditional_total_bpd"]  # the label reaches the network
    # The grid: 20 samples of 10 classes, 2 per row (8×8 images, 1-pixel margins), saved scaled up k times.
    height, width = np.asarray(Image.open(summary["samples"])).shape[:2]
    k = width // (2 * 9 + 1)
    assert (height, width) == (k * (10 * 9 + 1), k * (2 * 9 + 1)), (height, width)
    mesh = make_mesh()
    config, state = load_checkpoint(str(workdir), mesh=mesh)
    assert config.model.num_classes == 10 and state.objective.num_classes == 10
    assert state.params["model"]["class_emb"]["kernel"].shape == (11, 64)


@pytest.mark.slow(10)
def test_guided_samples_depend_on_the_label_and_on_the_weight(conditional_run):
    workdir, _ = conditional_run
    mesh = make_mesh()
    _, state = load_checkpoint(str(workdir), mesh=mesh)
    draw = lambda labels, w: generate_samples(state, mesh=mesh, num=8, key=jax.random.key(1), batch_size=8,  # noqa: E731
                                              sampler="ddim", sample_steps=4, labels=labels, guidance=w)
    zeros, ones = np.zeros(8, np.int32), np.ones(8, np.int32)
    a, b, c = draw(zeros, 1.0), draw(ones, 1.0), draw(zeros, 3.0)
    assert a.shape == (8, 8, 8, 1) and a.dtype == np.uint8
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, draw(zeros, 1.0))  # the same key: the same images
    with pytest.raises(ValueError, match=r"labels must be 8 integer classes in 0..10 \(10: no label\)"):
        draw(np.full(8, 11), 1.0)
    with pytest.raises(ValueError, match=r"labels must be 8 integer classes"):
        draw(np.zeros(7, np.int32), 1.0)


def test_labelled_data_is_checked_for_a_conditional_model():
    images = np.zeros((4, 8, 8, 1), np.uint8)
    check_labels(ArraySource(images, None), 0)  # an unconditional model reads no labels
    check_labels(ArraySource(images, np.array([0, 1, 2, 9])), 10)
    with pytest.raises(ValueError, match=r"npz:x.npz train has no labels, but model.num_classes=10 makes the model "
                                         r"class-conditional: use labelled data, or model.num_classes=0."):
        check_labels(ArraySource(images, None), 10, "npz:x.npz train")
    with pytest.raises(ValueError, match=r"has the label 10, outside 0..9 \(model.num_classes=10\)"):
        check_labels(ArraySource(images, np.array([0, 1, 2, 10])), 10)


def test_a_conditional_run_on_unlabelled_data_stops_before_making_its_work_directory(tmp_path, micro_run):
    images = (np.arange(40 * 64) % 256).astype(np.uint8).reshape(40, 8, 8, 1)
    np.savez(tmp_path / "unlabelled.npz", images=images)
    config = micro_run("conditional")
    config.data.update(source=f"npz:{tmp_path / 'unlabelled.npz'}", train_split="all", eval_split="all")
    with pytest.raises(ValueError, match=r"has no labels, but model.num_classes=10"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow(8)
def test_an_unconditional_run_of_before_still_loads_and_evaluates(tmp_path, reference):
    """A work directory written before num_classes, label_dropout and guidance existed (its
    config.json without them) loads as an unconditional model and evaluates."""
    workdir = tmp_path / "old"
    shutil.copytree(reference[0], workdir)
    config = json.loads((workdir / "config.json").read_text())
    del config["model"]["num_classes"], config["training"]["label_dropout"], config["training"]["guidance"]
    (workdir / "config.json").write_text(json.dumps(config))
    mesh = make_mesh()
    loaded, state = load_checkpoint(str(workdir), mesh=mesh)
    assert loaded.model.num_classes == 0 and state.objective.num_classes == 0
    source = load_source("digits", "test")
    result = evaluate_bpd(state, ArraySource(np.stack([source[i]["image"] for i in range(32)]), None), mesh=mesh,
                          batch_size=32, key=jax.random.key(0))
    assert np.isfinite(result["bpd"]["total"]["mean"]) and "bpd_unconditional" not in result

"""Per-image seeding: image i of seed s is drawn from its own generator seeded s + i, so it never depends on its
batch; ``seeding="batch"`` keeps the reference's one generator for the whole batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalekv.checks import check_seeds
from scalekv.cli import main
from scalekv.evaluation import EvalConfig, run_eval
from scalekv.sampling import sample_top_k_top_p
from tests.helpers import tiny_pipeline
from tests.test_infinity import TINY_SCHEDULE, random_text
from tests.test_infinity import tiny_pipeline as tiny_infinity

SAMPLING = dict(cfg=1.5, top_k=20, top_p=0.9)


# -- the seeds ---------------------------------------------------------------------------------------------------
def test_an_integer_seed_gives_consecutive_seeds_and_a_list_one_per_image():
    assert check_seeds(5, 3) == [5, 6, 7]
    assert check_seeds(None, 2) == [0, 1]
    assert check_seeds([9, 4, 9], 3) == [9, 4, 9]
    assert check_seeds((1, 2), 2) == [1, 2]
    assert check_seeds(7, 3, seeding="batch") == [7]


@pytest.mark.parametrize(
    ("seed", "batch", "seeding", "match"),
    [
        ([1, 2], 3, "image", r"seed=\[1, 2\]: 2 seeds for a batch of 3; expected one per image"),
        ([1, -2, 3], 3, "image", r"seed\[1\]=-2: expected an integer seed in \[0, 2\*\*63\)"),
        ([1, 2.0], 2, "image", r"seed\[1\]=2.0: expected an integer seed"),
        (2**63 - 2, 3, "image", r"seed=9223372036854775806: .*seed \+ 2, the last seed used"),
        ([1, 2], 2, "batch", r"seed=\[1, 2\]: seeding='batch' takes one integer seed"),
        (1, 2, "row", r"seeding='row': expected one of \['image', 'batch'\]"),
    ],
)
def test_bad_seeds_and_seedings_are_refused_by_name(seed, batch, seeding, match):
    with pytest.raises(ValueError, match=match):
        check_seeds(seed, batch, seeding=seeding)


def test_per_row_generators_draw_each_row_as_if_it_were_alone():
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))
    rows = sample_top_k_top_p(
        logits, top_k=10, top_p=0.9, generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)]
    )
    for i, s in enumerate((4, 5, 6)):
        alone = sample_top_k_top_p(logits[i : i + 1], top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(s))
        assert torch.equal(rows[i : i + 1], alone)
    with pytest.raises(ValueError, match="2 generators for 3 rows of logits"):
        sample_top_k_top_p(logits, generator=[torch.Generator(), torch.Generator()])


# -- VAR -----------------------------------------------------------------------------------------------------------
def test_var_batch_row_equals_the_image_generated_alone_with_its_seed():
    pipe = tiny_pipeline()
    labels = [3, 1, 4, 1]
    batch = pipe.generate(labels, seed=10, **SAMPLING)
    for i, label in enumerate(labels):
        alone = pipe.generate([label], seed=10 + i, **SAMPLING)
        assert torch.equal(batch.tokens[i : i + 1], alone.tokens), f"image {i}"
        assert torch.allclose(batch.images[i : i + 1], alone.images, atol=1e-5)
    # the two copies of label 1 have different seeds, so they differ
    assert not torch.equal(batch.tokens[1], batch.tokens[3])


def test_var_list_of_seeds_is_one_per_label_and_a_wrong_length_is_refused():
    pipe = tiny_pipeline()
    listed = pipe.generate([2, 5], seed=[7, 3], **SAMPLING)
    assert torch.equal(listed.tokens[0:1], pipe.generate([2], seed=7, **SAMPLING).tokens)
    assert torch.equal(listed.tokens[1:2], pipe.generate([5], seed=3, **SAMPLING).tokens)
    with pytest.raises(ValueError, match=r"seed=\[7, 3, 1\]: 3 seeds for a batch of 2"):
        pipe.generate([2, 5], seed=[7, 3, 1], **SAMPLING)
    with pytest.raises(ValueError, match=r"seeding='images': expected one of"):
        pipe.generate([2, 5], seed=0, seeding="images", **SAMPLING)


def test_var_batch_seeding_draws_the_whole_batch_from_one_generator():
    """The behaviour before per-image seeds: one multinomial over the batch's rows from one generator."""
    pipe = tiny_pipeline()
    labels = [3, 1, 4]
    old = pipe.generate(labels, seed=10, seeding="batch", keep_logits=True, **SAMPLING)
    gen = torch.Generator().manual_seed(10)
    for logits, scale in zip(old.logits, old.scales, strict=True):
        expected = sample_top_k_top_p(logits, top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], generator=gen)
        assert torch.equal(scale.tokens, expected), f"scale {scale.index}"
    new = pipe.generate(labels, seed=10, **SAMPLING)
    assert not torch.equal(old.tokens[1:], new.tokens[1:])  # rows 1 and 2 are seeded on their own now


def test_greedy_ignores_seeding():
    pipe = tiny_pipeline()
    a = pipe.generate([1, 2], seed=0, greedy=True, **SAMPLING)
    b = pipe.generate([1, 2], seed=[5, 9], greedy=True, **SAMPLING)
    c = pipe.generate([1, 2], seed=3, greedy=True, seeding="batch", **SAMPLING)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)


# -- Infinity ------------------------------------------------------------------------------------------------------
def test_infinity_batch_row_equals_the_prompt_generated_alone_with_its_seed():
    pipe, text = tiny_infinity(), random_text([3, 7, 5])
    kw = dict(schedule=TINY_SCHEDULE, tau=2.0, top_k=0, top_p=0.0)
    batch = pipe.generate(text, seed=20, **kw)
    for i in range(3):
        alone = pipe.generate(text.select([i]), seed=20 + i, **kw)
        assert torch.equal(batch.tokens[i : i + 1], alone.tokens), f"prompt {i}"
    listed = pipe.generate(text, seed=[22, 20, 21], **kw)
    assert torch.equal(listed.tokens[0:1], pipe.generate(text.select([0]), seed=22, **kw).tokens)
    with pytest.raises(ValueError, match=r"seed=\[1, 2\]: 2 seeds for a batch of 3"):
        pipe.generate(text, seed=[1, 2], **kw)


def test_infinity_batch_seeding_draws_one_multinomial_per_scale_for_the_batch():
    pipe, text = tiny_infinity(), random_text([3, 7])
    kw = dict(schedule=TINY_SCHEDULE, tau=2.0, top_k=0, top_p=0.0)
    old = pipe.generate(text, seed=4, seeding="batch", keep_logits=True, **kw)
    gen = torch.Generator().manual_seed(4)
    for logits, scale in zip(old.logits, old.scales, strict=True):
        bits = sample_top_k_top_p(logits.reshape(2, -1, 2), generator=gen).view(scale.tokens.shape).to(torch.uint8)
        assert torch.equal(scale.tokens, bits), f"scale {scale.index}"
    assert not torch.equal(old.tokens[1], pipe.generate(text, seed=4, **kw).tokens[1])


# -- commands ------------------------------------------------------------------------------------------------------
def test_generate_image_2_of_a_batch_is_byte_identical_to_it_alone(tmp_path):
    batch, alone = tmp_path / "batch", tmp_path / "alone"
    assert main(["generate", "--model", "demo", "--labels", "0,1,2,3", "--seed", "0", "--out", str(batch)]) == 0
    assert main(["generate", "--model", "demo", "--labels", "2", "--seed", "2", "--out", str(alone)]) == 0
    assert (batch / "0002.png").read_bytes() == (alone / "0000.png").read_bytes()
    assert (batch / "0001.png").read_bytes() != (alone / "0000.png").read_bytes()
    stats = json.loads((batch / "stats.json").read_text())
    assert stats["seed"] == 0 and stats["seeding"] == "image" and stats["seeds"] == [0, 1, 2, 3]


def test_generate_batch_seeding_couples_the_images_again(tmp_path):
    batch, alone = tmp_path / "batch", tmp_path / "alone"
    args = ["generate", "--model", "demo", "--seeding", "batch", "--seed", "0"]
    assert main([*args, "--labels", "0,1,2,3", "--out", str(batch)]) == 0
    assert main([*args[:-1], "2", "--labels", "2", "--out", str(alone)]) == 0
    assert (batch / "0002.png").read_bytes() != (alone / "0000.png").read_bytes()
    assert json.loads((batch / "stats.json").read_text())["seeds"] == [0, 0, 0, 0]


def _eval_images(out: Path, batch_size: int, seeding: str = "image") -> dict[str, bytes]:
    config = EvalConfig(
        model="tiny",
        out=str(out),
        policies=["full"],
        budgets=[0.5],
        n=5,
        batch_size=batch_size,
        seed=3,
        seeding=seeding,
        top_k=20,
        top_p=0.9,
        fid=False,
        lpips=None,
        progress=False,
        warmup=False,
        device="cpu",
    )
    run_eval(config, pipeline=tiny_pipeline())
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def test_eval_images_do_not_depend_on_the_batch_size(tmp_path):
    by2, by5 = _eval_images(tmp_path / "b2", 2), _eval_images(tmp_path / "b5", 5)
    assert len(by2) == 5 and by2 == by5
    # and image j is the one its seed (3 + j) gives alone
    pipe = tiny_pipeline()
    from scalekv.commands.generate import png_images

    alone = png_images(pipe.generate([4 % 10], seed=3 + 4, **SAMPLING).images)["0000.png"]
    assert by2["images/full/000004.png"] == alone
    assert _eval_images(tmp_path / "old2", 2, "batch") != _eval_images(tmp_path / "old5", 5, "batch")


def test_eval_refuses_to_resume_a_run_with_the_other_seeding(tmp_path):
    _eval_images(tmp_path / "run", 2, "batch")
    with pytest.raises(ValueError, match=r"different settings \(.*seeding"):
        _eval_images(tmp_path / "run", 2, "image")

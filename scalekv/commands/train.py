"""``scalekv train {tokenizer,var,export}``: train the demo model on Fashion-MNIST and export it.

    scalekv train tokenizer --run RUNS/tok
    scalekv train var --run RUNS/var --tokenizer RUNS/tok
    scalekv train export --tokenizer RUNS/tok --var RUNS/var --out scalekv/weights/demo
    scalekv train evaluate --tokenizer RUNS/tok --grid docs/demo_samples.png

Every stage resumes from ``RUN/last.pt`` when re-run with the same settings; Ctrl-C loses at most ``--save-every``
steps. Data: Debian's ``dataset-fashion-mnist`` (or ``--data-root``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the demo tokenizer / VAR on Fashion-MNIST, or export them")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--run", dest="run_dir", required=True, help="run folder (config, last.pt, train.log); resumes if present"
        )
        q.add_argument("--preset", default="demo", help="model/optimiser preset: demo or tiny")
        q.add_argument("--steps", type=int, help="override the preset's optimiser steps")
        q.add_argument("--batch-size", type=int, help="override the preset's batch size")
        q.add_argument("--lr", type=float, help="override the preset's peak learning rate")
        q.add_argument("--seed", type=int, help="override the preset's seed")
        q.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
        q.add_argument("--data-root", help="folder with the Fashion-MNIST idx .gz files")
        q.add_argument("--limit", type=int, help="use only the first N training images (for quick checks)")
        q.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared machine)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to train.log)")

    t = stages.add_parser("tokenizer", help="train the multi-scale VQ tokenizer")
    common(t)
    t.set_defaults(run=run_tokenizer)
    v = stages.add_parser("var", help="train the class-conditional VAR on a trained tokenizer's tokens")
    common(v)
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="the tokenizer: its run folder, or an exported model folder")
    src.add_argument(
        "--from-export",
        dest="from_export",
        help="continue from an exported model folder (e.g. scalekv/weights/demo): its tokenizer (exported with its "
        "encoder) and its transformer's weights, with a fresh optimiser and schedule",
    )
    v.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null class (for CFG)")
    v.set_defaults(run=run_var)
    e = stages.add_parser("export", help="write the trained weights + config as a loadable model folder")
    e.add_argument("--tokenizer", required=True, help="the tokenizer: its run folder, or an exported model folder")
    e.add_argument("--var", required=True, help="the VAR's run folder")
    e.add_argument(
        "--out",
        required=True,
        help="output folder, e.g. scalekv/weights/demo: new, empty, or an earlier export (its files are replaced)",
    )
    e.add_argument("--cfg", type=float, default=1.5, help="default guidance scale stored with the model")
    e.add_argument("--top-k", type=int, default=900, help="default top-k stored with the model (0: off)")
    e.add_argument("--top-p", type=float, default=0.96, help="default top-p stored with the model (0: off)")
    e.set_defaults(run=run_export)
    m = stages.add_parser("evaluate", help="measure the demo model: tokenizer PSNR and FID vs the test split")
    m.add_argument(
        "--tokenizer",
        required=True,
        help="the tokenizer (its encoder measures reconstruction): its run folder, or an exported model folder",
    )
    m.add_argument("--weights", help="exported model folder (default: the one shipped in the package)")
    m.add_argument("--samples", type=int, default=1000, help="generated images for FID (100 per class for 1000)")
    m.add_argument("--ref-images", type=int, default=1000, help="test-split images for the FID reference")
    m.add_argument("--ref-cache", help=".npy file keeping the test images' Inception features between runs")
    m.add_argument("--batch-size", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--data-root", help="folder with the Fashion-MNIST idx .gz files")
    m.add_argument(
        "--grid", help="also write a sample grid PNG here (10 per class, rows = classes; an existing PNG is replaced)"
    )
    m.set_defaults(run=run_evaluate)


EXPORT_FILES = ("config.json", "var.safetensors", "vae.safetensors", "plans")  # plans/: calibrated later


def _check_run(args: argparse.Namespace) -> None:
    """The run folder (new, empty, or a training run, which resumes) and --seed, before anything is loaded."""
    from ..checks import check_seed
    from ..outputs import check_output_folder

    check_output_folder(
        args.run_dir,
        flag="--run",
        owned=lambda folder: (folder / "config.json").is_file(),
        expected="a new or empty folder, or a training run folder to resume",
    )
    if args.seed is not None:
        check_seed(args.seed, "--seed")


def _is_export(folder) -> bool:
    return (folder / "config.json").is_file() and {e.name for e in folder.iterdir()} <= set(EXPORT_FILES)


def _optim(args: argparse.Namespace, presets: dict):
    if args.preset not in presets:
        raise ValueError(f"--preset {args.preset!r}: expected one of {sorted(presets)}")
    overrides = {
        k: getattr(args, a)
        for k, a in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"))
        if getattr(args, a) is not None
    }
    return replace(presets[args.preset], **overrides)


def _train_images(args: argparse.Namespace, size: int):
    import torch

    from ..data import load_images

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected a positive number of threads")
        torch.set_num_threads(args.threads)

    images, labels = load_images("train", size, args.data_root)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit {args.limit}: expected a positive number of images")
        images, labels = images[: args.limit], labels[: args.limit]
    return images, labels


def run_tokenizer(args: argparse.Namespace) -> int:
    from ..data import load_images
    from ..training.presets import TOKENIZER_OPTIM, TOKENIZER_PRESETS
    from ..training.tokenizer import train_tokenizer

    _check_run(args)
    opt_cfg = _optim(args, TOKENIZER_OPTIM)
    cfg = TOKENIZER_PRESETS[args.preset]
    images, _ = _train_images(args, cfg.image_size)
    test = load_images("test", cfg.image_size, args.data_root)[0][:1000]
    train_tokenizer(
        cfg, opt_cfg, images, args.run_dir, save_every=args.save_every, eval_images=test, progress=not args.no_progress
    )
    print(f"tokenizer trained: {args.run_dir}/last.pt")
    return 0


def run_var(args: argparse.Namespace) -> int:
    from ..training.presets import VAR_OPTIM, VAR_TRAIN_PRESETS
    from ..training.transformer import exported_training, load_export, load_tokenizer_run, train_var

    _check_run(args)
    opt_cfg = _optim(args, VAR_OPTIM)
    cfg = VAR_TRAIN_PRESETS[args.preset]
    init = init_training = None
    if args.from_export is not None:
        vae, init = load_export(args.from_export)
        init_training = exported_training(args.from_export)
    else:
        vae = load_tokenizer_run(args.tokenizer)
    images, labels = _train_images(args, vae.cfg.image_size)
    train_var(
        cfg,
        opt_cfg,
        vae,
        images,
        labels,
        args.run_dir,
        cond_drop=args.cond_drop,
        save_every=args.save_every,
        progress=not args.no_progress,
        init=init,
        init_source=str(args.from_export or ""),
        init_training=init_training,
    )
    print(f"VAR trained: {args.run_dir}/last.pt")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder
    from ..training.transformer import export_demo

    check_output_folder(
        args.out,
        owned=_is_export,
        expected=f"a new or empty folder, or an earlier export ({', '.join(EXPORT_FILES)}), whose files are replaced",
    )
    sampling = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
    paths = export_demo(args.tokenizer, args.var, args.out, sampling)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..checks import check_seed
    from ..outputs import check_output_file
    from ..training.evaluate import evaluate_demo

    if args.grid is not None:
        check_output_file(args.grid, flag="--grid", owned=lambda p: p.suffix == ".png", expected="a PNG file name")
    if args.ref_cache is not None:  # read when present, else written
        check_output_file(
            args.ref_cache, flag="--ref-cache", owned=lambda p: p.suffix == ".npy", expected="a .npy file"
        )
    check_seed(args.seed, "--seed")
    report = evaluate_demo(
        args.tokenizer,
        args.weights,
        samples=args.samples,
        ref_images=args.ref_images,
        batch_size=args.batch_size,
        seed=args.seed,
        data_root=args.data_root,
        grid=args.grid,
        ref_cache=args.ref_cache,
    )
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0

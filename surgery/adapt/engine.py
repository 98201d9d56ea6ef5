"""`surgery adapt`: distil a frozen teacher into the parameters a checkpoint's recipes mark trainable.

One engine for every recipe that trains. Loss = α·KL(teacher ‖ student) + (1 − α)·CE, AdamW with warmup and a
cosine schedule, gradient accumulation, bf16 autocast where supported, periodic checkpoints and `--resume`. It runs
on CPU, or under `accelerate launch` on one or many GPUs with no code change. Every random choice of a step
(its batch, a recipe's sampled ranks) comes from a generator seeded by (seed, step), so a resumed run ends with
the same weights as an uninterrupted one.
"""

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgery.adapt.settings import AdaptSettings
from surgery.calibrate.text import CalibrationSettings, calibration_ids
from surgery.calibrate.corpora import DEFAULT_CALIBRATION, SELF_GENERATED
from surgery.checkpoint.card import render_card
from surgery.checkpoint.records import read_recipe
from surgery.base.errors import SurgeryError
from surgery.base.sizes import DEFAULT_SHARD_SIZE
from surgery.checkpoint.export import finish_checkpoint, write_state_dict
from surgery.base.outputs import check_output, exclusive, staging
from surgery.train.lora import add_lora, is_lora_parameter, linear_targets, merge_lora
from surgery.train.teacher import shared_teacher
from surgery.recipes import recipes_from_record
from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.checkpoint.families import source_config, surgery_config_from_source
from surgery.checkpoint.loading import check_same_vocabulary, load_source_model, load_tokenizer
from surgery.checkpoint.sources import resolve
from surgery.checkpoint.tensor_io import LazyCheckpoint
from surgery.calibrate.source_model import load_calibration_model

log = logging.getLogger(__name__)

STATE_FILE = "adapt_progress.json"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """α·KL(teacher ‖ student) + (1 − α)·CE, per token, on next-token predictions (no teacher logits: α = 0)."""
    student = student_logits[:, :-1].float().log_softmax(-1)
    ce = F.nll_loss(student.flatten(0, 1), labels[:, 1:].flatten())
    if teacher_logits is None:
        return ce
    teacher = teacher_logits[:, :-1].float().log_softmax(-1)
    kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    return alpha * kl + (1 - alpha) * ce


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing under its transformers 5.x name, or the older one."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def batch_indices(seed: int, step: int, micro: int, batch_size: int, accum: int, count: int) -> torch.Tensor:
    """The samples of one micro-batch: epochs of seeded permutations, walked in order."""
    first = ((step * accum) + micro) * batch_size
    positions = torch.arange(first, first + batch_size)
    epochs = positions // count
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        chosen = epochs == epoch
        out[chosen] = order[positions[chosen] % count]
    return out


def latest_state(work_dir: Path) -> Path | None:
    states = sorted(work_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if work_dir.is_dir() else []
    return states[-1] if states else None


def state_folder(out: Path) -> Path:
    """Where the periodic training state of `--out` lives, beside it."""
    return out.parent / f".{out.name}.adapt-state"


def load_student(source) -> tuple[torch.nn.Module, Any]:
    """The model to train, always in the surgery architecture, and for a plain family checkpoint (depth growth,
    upcycling) that family's config to export it under again: one training path, whose MoE blocks count and keep
    their routing for the load-balancing loss, whatever the checkpoint's format."""

    if source.model_type == SurgeryConfig.model_type:
        return load_source_model(source), None
    return load_calibration_model(source, surgery_config_from_source(source.config)), source_config(source.config)


@dataclass
class AdaptJob:
    """One `surgery adapt` run: what to train, where to write it, and how (settings come from the CLI)."""

    checkpoint: Path
    out: Path
    settings: AdaptSettings
    resume: bool = False
    overwrite: bool = False
    verify: bool = True
    progress: bool = True
    stop_after: int | None = None  # end early after this many steps, leaving the periodic state (tests resume)
    allow_pickle: bool = False
    max_shard_size: int = DEFAULT_SHARD_SIZE
    on_step: Callable[[int, torch.nn.Module], None] | None = None


@dataclass
class Run:
    """What the phases of one run share once the models are built."""

    recipes: list
    settings: AdaptSettings
    alpha: float
    precision: str
    accelerator: Any
    model: torch.nn.Module
    family: Any
    teacher: torch.nn.Module
    teacher_bytes: int
    trainable: list
    lora_targets: list
    data: torch.Tensor  # the training token windows


def adapt(checkpoint: Path, out: Path, settings: AdaptSettings, resume: bool = False, overwrite: bool = False,
          verify: bool = True, progress: bool = True, stop_after: int | None = None,
          allow_pickle: bool = False, on_step: Callable[[int, torch.nn.Module], None] | None = None,
          max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Train `checkpoint`'s trainable parameters against `settings.teacher`, export to `out`.

    `--resume` continues from the saved state of this `--out` and never implies `--overwrite`.
    `stop_after` ends the run early after that many steps, leaving its periodic state behind (used to test resume).
    `on_step(step, model)` runs after each optimizer step (and with step 0 before the first), on the unwrapped
    model in train mode: a benchmark's learning curve.
    """
    job = AdaptJob(Path(checkpoint), Path(out), settings, resume, overwrite, verify, progress, stop_after,
                   allow_pickle, max_shard_size, on_step)
    teacher_path = Path(settings.teacher).expanduser()
    check_output(job.out, [job.checkpoint] + ([teacher_path] if teacher_path.exists() else []))
    if not (job.checkpoint / "config.json").is_file():
        raise SurgeryError(f"{job.checkpoint} is not a checkpoint folder", hint="adapt a folder written by `surgery convert`")
    record = read_recipe(job.checkpoint)
    if not record:
        raise SurgeryError(f"{job.checkpoint} has no recipe.yaml", hint="adapt a checkpoint made by `surgery convert`")
    if job.out.exists() and not overwrite:
        raise SurgeryError(f"{job.out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    if resume and latest_state(state_folder(job.out)) is None:
        raise SurgeryError(f"no saved training state for {job.out} (looked in {state_folder(job.out)})",
                           hint="run without --resume to start from step 0")
    with exclusive(job.out):
        run = prepare(job, record)
        start, last_loss, began = train(job, run)
        if job.stop_after is not None and job.stop_after < run.settings.steps:
            return state_folder(job.out)
        return export(job, run, record, start, last_loss, began)


def prepare(job: AdaptJob, record: dict) -> Run:
    """The accelerator, the student with its trainable parameters marked, the teacher, and the training tokens."""
    from accelerate import Accelerator

    recipes = recipes_from_record(record)
    alpha = job.settings.alpha
    if alpha is None:
        alpha = next((r.distill_alpha for r in recipes if r.distill_alpha is not None), 0.5)
    settings = job.settings.for_recipes(recipes)
    precision = settings.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True without CUDA: a CPU launch of several processes (torchrun) then runs as DDP over gloo. The schedule
    # counts optimizer steps, so it steps once per optimizer step (accelerate's default steps it once per process).
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, mixed_precision=precision,
                              cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    student_source = resolve(str(job.checkpoint))
    teacher_source = resolve(settings.teacher, allow_pickle=job.allow_pickle)
    check_same_vocabulary(student_source, teacher_source, "teacher")
    model, family = load_student(student_source)
    trainable_names = {name for name, _ in model.named_parameters()
                       if any(recipe.is_trainable(name, model.config) for recipe in recipes)}
    if not trainable_names:
        raise SurgeryError(f"the recipes of {job.checkpoint} ({', '.join(r.name for r in recipes)}) train nothing",
                           hint="adapt a checkpoint whose recipe has trainable parts")
    lora_targets = linear_targets(model, trainable_names) if settings.lora_rank else []
    teacher, teacher_bytes = load_teacher(teacher_source, model, settings, accelerator,
                                          trainable_names - {f"{target}.weight" for target in lora_targets})
    trainable = mark_trainable(model, recipes, settings, lora_targets)  # before the data: LoRA's init draws first
    data = training_tokens(settings, load_tokenizer(teacher_source.folder), teacher)
    return Run(recipes, settings, alpha, precision, accelerator, model, family, teacher, teacher_bytes, trainable,
               lora_targets, data)


def load_teacher(source, model, settings: AdaptSettings, accelerator, in_place: set[str]):
    """The frozen teacher, sharing the student's untrained tensors where it can (not under FSDP, which flattens
    and shards parameters, so a teacher there loads its own copy); and the bytes it holds of its own."""
    from accelerate.utils import DistributedType

    shares = not settings.copy_teacher and accelerator.distributed_type != DistributedType.FSDP
    if shares and source.model_type != model.config.model_type:
        return shared_teacher(source, model, in_place)
    teacher = load_source_model(source).requires_grad_(False)
    return teacher, sum(t.numel() * t.element_size() for t in teacher.parameters())


def mark_trainable(model, recipes: list, settings: AdaptSettings, lora_targets: list) -> list:
    """Let the recipes prepare the model, add LoRA updates, and switch on exactly the trainable parameters; the
    optimiser's groups are by learning-rate scale (`param_groups`)."""
    for recipe in recipes:
        recipe.prepare_training(model)
    if lora_targets:
        add_lora(model, lora_targets, settings.lora_rank, settings.lora_alpha or 2.0 * settings.lora_rank)
    trainable = []
    for name, parameter in model.named_parameters():
        train = is_lora_parameter(name) or any(recipe.is_trainable(name, model.config) for recipe in recipes)
        parameter.requires_grad_(train and ".base_layer." not in name)
        if parameter.requires_grad:
            trainable.append((name, parameter))
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    return trainable


def param_groups(run: Run) -> list[dict]:
    groups: dict[float, list] = {}
    for name, parameter in run.trainable:
        scale = next((r.lr_scale(name) for r in run.recipes if r.is_trainable(name, run.model.config)), 1.0)
        groups.setdefault(scale, []).append(parameter)
    return [{"params": params, "lr": run.settings.lr * scale} for scale, params in groups.items()]


def training_tokens(settings: AdaptSettings, tokenizer, teacher) -> torch.Tensor:
    torch.manual_seed(settings.seed)
    text = settings.data or (DEFAULT_CALIBRATION if tokenizer is not None else SELF_GENERATED)
    if text == SELF_GENERATED and settings.data is None:
        log.warning("the teacher has no tokenizer: training on text it samples itself")
    return calibration_ids(CalibrationSettings(text, settings.num_samples, settings.seq_len, settings.seed),
                           tokenizer, teacher)


def train(job: AdaptJob, run: Run) -> tuple[int, float, float]:
    """The optimisation loop, resumable from the periodic state; returns (first step, last loss, start time)."""
    from transformers import get_cosine_schedule_with_warmup

    settings, accelerator = run.settings, run.accelerator
    optimizer = torch.optim.AdamW(param_groups(run), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    model, optimizer, scheduler = accelerator.prepare(run.model, optimizer, scheduler)
    run.model = model
    teacher = run.teacher.to(accelerator.device).eval()
    model.train()

    work_dir = state_folder(job.out)
    start = 0
    if job.resume and (state := latest_state(work_dir)) is not None:
        accelerator.load_state(str(state))
        start = json.loads((state / STATE_FILE).read_text())["step"]
        log.info("resuming from %s (step %d)", state, start)
    elif work_dir.exists():
        shutil.rmtree(work_dir)

    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum * accelerator.num_processes
    bar = tqdm(total=settings.steps, initial=start, desc="adapt", unit="step",
               disable=not job.progress or not accelerator.is_main_process)
    began, last_loss = time.perf_counter(), float("nan")
    end = settings.steps if job.stop_after is None else min(settings.steps, job.stop_after)
    parameters = [parameter for _, parameter in run.trainable]
    if job.on_step is not None and start == 0:
        job.on_step(0, accelerator.unwrap_model(model))
    for step in range(start, end):
        for micro in range(settings.grad_accum):
            rank_slice = batch_indices(settings.seed, step, micro, settings.batch_size * accelerator.num_processes,
                                       settings.grad_accum, run.data.shape[0])
            batch = rank_slice.chunk(accelerator.num_processes)[accelerator.process_index]
            ids = run.data[batch].to(accelerator.device)
            for recipe in run.recipes:
                recipe.before_step(accelerator.unwrap_model(model), step_generator(settings.seed, step, micro))
            with accelerator.accumulate(model), accelerator.autocast():
                with torch.no_grad():  # α = 0 (continual pre-training): the loss is plain cross-entropy
                    teacher_logits = teacher(ids, use_cache=False).logits if run.alpha > 0 else None
                student_logits = model(ids, use_cache=False).logits
                loss = distillation_loss(student_logits, teacher_logits, ids, run.alpha)
                for recipe in run.recipes:
                    extra = recipe.regulariser(accelerator.unwrap_model(model))
                    if extra is not None:
                        loss = loss + extra
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            last_loss = loss.item()
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_step * (done - start) / (time.perf_counter() - began):.0f}")
        if job.on_step is not None:
            job.on_step(done, accelerator.unwrap_model(model))
        if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
            save_state(accelerator, work_dir, done)
    bar.close()
    return start, last_loss, began


def save_state(accelerator, work_dir: Path, step: int) -> None:
    """The periodic training state, keeping only the newest."""
    state = work_dir / f"step-{step}"
    accelerator.save_state(str(state))
    if accelerator.is_main_process:
        (state / STATE_FILE).write_text(json.dumps({"step": step}))
        for old in work_dir.glob("step-*"):
            if old != state:
                shutil.rmtree(old, ignore_errors=True)


def export(job: AdaptJob, run: Run, record: dict, start: int, last_loss: float, began: float) -> Path:
    """Undo the training-time parametrisations, gather the weights, and write the checkpoint with its record."""
    accelerator, settings = run.accelerator, run.settings
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(run.model)
    for recipe in run.recipes:
        recipe.finish_training(student)
    if run.lora_targets:
        merge_lora(student)
    weights = accelerator.get_state_dict(student)  # gathers the full weights under FSDP
    if accelerator.is_main_process:
        tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum * accelerator.num_processes
        record["adapt"] = {**asdict(settings), "alpha": run.alpha, "lr": settings.lr, "mixed_precision": run.precision,
                           "tokens": tokens_per_step * (settings.steps - start),
                           "wall_s": round(time.perf_counter() - began, 1),
                           "final_loss": round(last_loss, 5), "processes": accelerator.num_processes,
                           "resumed_from_step": start or None, "checkpoint": str(job.checkpoint),
                           "teacher_own_bytes": run.teacher_bytes,
                           "trainable_parameters": sum(p.numel() for _, p in run.trainable)}
        dtype = LazyCheckpoint(job.checkpoint).dtype()  # the checkpoint's storage dtype, whatever we trained in
        config = student.config
        with staging(job.out, job.overwrite) as folder:
            write_state_dict(weights, config, folder, dtype, job.max_shard_size,
                             family=run.family.model_type if run.family is not None else None)
            finish_checkpoint(folder, run.family if run.family is not None else config, dtype, job.checkpoint, record,
                              job.verify)
            render_card(folder, model_id=str(job.out))
        shutil.rmtree(state_folder(job.out), ignore_errors=True)
    return job.out

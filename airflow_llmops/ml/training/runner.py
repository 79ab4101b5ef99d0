"""One training job, start to finish: plan (``plan.py``), tokenizer, model, Trainer, evaluation, saved model,
tracking.

Every rank runs :func:`run`; the job-dir files, MLflow and codecarbon belong to rank 0 only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from airflow_llmops.ml.data.chat import ROLE_MARKERS
from airflow_llmops.ml.training import data as D
from airflow_llmops.ml.training import models as M
from airflow_llmops.ml.training.callbacks import ProgressCallback
from airflow_llmops.ml.training.energy import EnergyMeter, EnergyReading
from airflow_llmops.ml.training.errors import TrainingInputError
from airflow_llmops.ml.training.jobdir import Checkpoint, JobDir, ProgressWriter
from airflow_llmops.ml.training.metrics import classification_metrics, final_metrics
from airflow_llmops.ml.training.outputs import OutputTarget
from airflow_llmops.ml.training.plan import Placement, Prepared, preflight
from airflow_llmops.ml.training.preflight import explain_out_of_memory
from airflow_llmops.ml.training.tracking import MlflowTracker, flatten
from airflow_llmops.specs.training import TrainingSpec

# Per-file loading/saving bars interleave with the progress lines in a task log; progress.jsonl is the progress.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def training_arguments(
    spec: TrainingSpec, job: JobDir, where: Placement, source: M.ModelSource, eval_every_steps: int | None = None
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(job.checkpoints),
        per_device_train_batch_size=spec.per_device_batch_size,
        per_device_eval_batch_size=spec.per_device_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        logging_strategy="steps",
        logging_steps=spec.log_every_steps,
        save_strategy="steps",
        save_steps=spec.checkpoint_every_steps,
        save_total_limit=2,
        eval_strategy="steps" if eval_every_steps else "no",
        eval_steps=eval_every_steps,
        prediction_loss_only=spec.task != "classification",  # perplexity needs the loss only, not the logits
        report_to=[],  # MLflow is driven directly (tracking.py), with a run identity that survives retries
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=not where.cuda,
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        include_num_input_tokens_seen="non_padding",
        # The Trainer multiplies the loss by the world size when it divides by the tokens of all ranks; the
        # classification heads ignore that count and average per batch, so there the loss (and gradient) would
        # come out world_size times too large under DDP.
        average_tokens_across_devices=spec.task != "classification",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend=where.backend if where.world_size > 1 else None,
        # The offline defaults use every parameter; skipping the unused-parameter search saves a graph walk a step.
        ddp_find_unused_parameters=False if source.is_default else None,
    )


def tokenized(
    spec: TrainingSpec, prep: Prepared, job: JobDir, args: TrainingArguments
) -> tuple[Any, D.TokenizedDataset, D.TokenizedDataset]:
    """Tokenizer plus the train and validation examples."""
    splits = prep.splits
    chat = spec.task == "chat"
    if prep.source.path is None:
        with args.main_process_first(desc="train the BPE tokenizer"):
            resume_dir = prep.resume.path if prep.resume else None
            tokenizer = M.tiny_gpt2_tokenizer(
                D.chat_corpus(splits.train) if chat else D.tokenizer_corpus(splits.train),
                spec.max_seq_length,
                job.tokenizer,
                resume_dir,
                extra_special_tokens=ROLE_MARKERS if chat else (),
            )
    else:
        tokenizer = M.pretrained_tokenizer(prep.source)
    if chat:
        return (tokenizer, *_chat_examples(spec, prep, tokenizer))
    if spec.task == "causal_lm":
        eos = tokenizer.eos_token
        train = D.tokenize(tokenizer, D.lm_texts(splits.train, eos), spec.max_seq_length)
        valid = D.tokenize(tokenizer, D.lm_texts(splits.validation, eos), spec.max_seq_length)
        return tokenizer, train, valid
    texts, labels, _ = D.known_labels(splits.train, prep.label2id)
    v_texts, v_labels, dropped = D.known_labels(splits.validation, prep.label2id)
    if dropped:
        prep.notes.append(f"{dropped} validation rows have labels absent from the training split; not scored")
    train = D.tokenize(tokenizer, texts, spec.max_seq_length, labels)
    valid = D.tokenize(tokenizer, v_texts, spec.max_seq_length, v_labels)
    return tokenizer, train, valid


def _chat_examples(spec: TrainingSpec, prep: Prepared, tokenizer: Any) -> tuple[D.TokenizedDataset, D.TokenizedDataset]:
    """Conversations rendered by the tokenizer's chat template (the default one where it has none, saved with the
    model), labelled on the assistant's turns only."""
    if D.ensure_chat_template(tokenizer) and prep.source.path is not None:
        prep.notes.append(
            f"the tokenizer of {prep.source.name!r} has no chat template; using the default "
            "('<|role|>\\ncontent\\n' per message, EOS after each assistant turn), saved with the model"
        )
    train, train_stats = D.tokenize_chat(tokenizer, prep.splits.train, spec.max_seq_length)
    valid, valid_stats = D.tokenize_chat(tokenizer, prep.splits.validation, spec.max_seq_length)
    prep.notes.extend(train_stats.notes("train", spec.max_seq_length))
    prep.notes.extend(valid_stats.notes("validation", spec.max_seq_length))
    for split, dataset, stats in (("train", train, train_stats), ("validation", valid, valid_stats)):
        if len(dataset) == 0:
            raise TrainingInputError(
                f"dataset {prep.splits.name!r}: none of the {stats.conversations} {split} conversations has an "
                f"assistant token within max_seq_length={spec.max_seq_length} "
                f"({'; '.join(stats.notes(split, spec.max_seq_length)) or 'no conversations'}); raise "
                "max_seq_length or check the data"
            )
    return train, valid


def run(
    spec: TrainingSpec,
    job: JobDir,
    plan: tuple[Placement, Prepared] | None = None,
    *,
    callbacks: list[TrainerCallback] | None = None,
    eval_every_steps: int | None = None,
    tags: dict[str, str] | None = None,
    log_model: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and save; returns the final status (written by the caller on rank 0). ``plan`` is the
    result of :func:`~airflow_llmops.ml.training.plan.preflight` where the caller already ran it.

    ``callbacks`` join the Trainer's (the tuner's pruning callback), ``eval_every_steps`` evaluates on the
    validation split during training, ``tags`` go on the MLflow run, ``log_model=False`` keeps the model out of
    MLflow's artifacts (a tuning trial: only the best one is uploaded, to the study's run)."""
    if plan is None:
        where = Placement.from_env(spec)
        plan = where, preflight(spec, job, where)
    where, prep = plan
    if where.is_main and prep.resume is not None:
        print(f"[train] resuming from checkpoint {prep.resume.path} (step {prep.resume.step})", flush=True)
    args = training_arguments(spec, job, where, prep.source, eval_every_steps)
    tokenizer, train_set, valid_set = tokenized(spec, prep, job, args)
    for note in prep.notes if where.is_main else []:
        print(f"[train] note: {note}", flush=True)
    set_seed(spec.seed)  # the new head (or the whole tiny model) starts from the same weights on every rank
    model = M.build_model(spec, prep.source, tokenizer, prep.label2id)
    tracker = _start_tracking(spec, job, prep, where, tags or {})
    try:
        status = _train_and_save(
            spec=spec,
            job=job,
            where=where,
            prep=prep,
            args=args,
            model=model,
            tokenizer=tokenizer,
            train_set=train_set,
            valid_set=valid_set,
            tracker=tracker,
            callbacks=callbacks or [],
            log_model=log_model,
        )
    except BaseException:
        if tracker is not None:
            # A tracking failure here must not hide the error that ended training.
            with contextlib.suppress(Exception):
                tracker.end(succeeded=False)
        raise
    if tracker is not None:
        tracker.end(succeeded=True)
    return status


def _start_tracking(
    spec: TrainingSpec, job: JobDir, prep: Prepared, where: Placement, extra_tags: dict[str, str]
) -> MlflowTracker | None:
    if not where.is_main:
        return None
    tags = {
        "llmops.dataset": prep.splits.name,
        "llmops.model": prep.source.name,
        "llmops.task": spec.task,
        **extra_tags,
    }
    tracker = MlflowTracker.start(spec.mlflow_experiment, tags=tags)
    if tracker is not None:
        job.write_json(job.mlflow, tracker.ui_info())
        tracker.log_params(flatten(spec.to_dict()))
        tracker.set_tags({"llmops.world_size": str(where.world_size)})
    return tracker


def _train_and_save(
    *,
    spec: TrainingSpec,
    job: JobDir,
    where: Placement,
    prep: Prepared,
    args: TrainingArguments,
    model: torch.nn.Module,
    tokenizer: Any,
    train_set: D.TokenizedDataset,
    valid_set: D.TokenizedDataset,
    tracker: MlflowTracker | None,
    callbacks: list[TrainerCallback],
    log_model: bool,
) -> dict[str, Any]:
    writer = ProgressWriter(job.progress) if where.is_main else None
    progress = ProgressCallback(
        writer,
        samples_per_step=spec.per_device_batch_size * spec.gradient_accumulation_steps * where.world_size,
        metrics_sink=tracker.step_logger() if tracker is not None else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=valid_set,
        data_collator=D.PadCollator(tokenizer.pad_token_id, causal_lm=spec.task != "classification"),
        processing_class=tokenizer,
        compute_metrics=classification_metrics if spec.task == "classification" else None,
        callbacks=[progress, *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # its raw dicts would duplicate the progress lines
    meter = EnergyMeter()
    if where.is_main:
        meter.start()
    energy = EnergyReading(None, None)
    try:
        result = _train(trainer, spec, prep.resume)
    finally:
        if where.is_main:
            energy = meter.stop()
        if writer is not None:
            writer.close()
    evaluation = trainer.evaluate()
    _save(trainer, tokenizer, prep.output, spec, where)
    if not where.is_main:
        return {}
    metrics = final_metrics(
        spec.task, trainer.state, result=result, evaluation=evaluation, energy=energy, progress=progress
    )
    print(f"[train] evaluation on {prep.splits.name!r} validation: {evaluation}", flush=True)
    model_uri = prep.output.publish()
    if tracker is not None:
        tracker.log_metrics(trainer.state.global_step, metrics)
        if log_model:
            tracker.log_model(str(prep.output.local))
    return {
        "state": "succeeded",
        "model_uri": model_uri,
        "metrics": metrics,
        "resumed_from_step": prep.resume.step if prep.resume else None,
        "world_size": where.world_size,
        "mlflow_run_id": tracker.run_id if tracker is not None else None,
        "global_step": trainer.state.global_step,
        "dataset": prep.splits.name,
        "model": prep.source.name,
    }


def _train(trainer: Trainer, spec: TrainingSpec, resume: Checkpoint | None) -> Any:
    """Run the Trainer; running out of memory becomes an input error naming the batch size."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    except RuntimeError as err:
        explained = explain_out_of_memory(err, spec.per_device_batch_size, spec.max_seq_length)
        if explained is None:
            raise
        raise explained from None


def _save(trainer: Trainer, tokenizer: Any, output: OutputTarget, spec: TrainingSpec, where: Placement) -> None:
    """safetensors + config (with id2label for classification) + tokenizer (with its chat template), loadable with
    ``from_pretrained``; with ``lora.merge=False`` the adapters and ``adapter_config.json`` instead of the model."""
    if spec.lora is None:
        trainer.save_model(str(output.local))  # every rank calls it; the Trainer writes on the main process only
    elif where.is_main:
        assert trainer.model is not None
        M.exportable(trainer.model, merge=spec.lora.merge).save_pretrained(str(output.local))
    if where.is_main:
        tokenizer.save_pretrained(str(output.local))
        # The pickled TrainingArguments are a checkpoint's business; a published model folder stays pickle-free.
        (output.local / "training_args.bin").unlink(missing_ok=True)

"""The reference pipeline, built once for every platform: ``dags/llmops_<platform>.py`` call
:func:`reference_pipeline` with their platform and its settings, so the stages, their wiring and the run's Params
are the same code on local, SageMaker, Vertex AI and Azure ML. Parse-light: only Airflow's SDK and our operators.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, AssetAlias, Param

from airflow_llmops.operators import (
    DeployModelOperator,
    EvaluateModelOperator,
    LatestOnlyGateOperator,
    PlanRunOperator,
    PrepareDatasetOperator,
    QuantizeModelOperator,
    RegisterModelOperator,
    RolloutOperator,
    TrainModelOperator,
    ValidateDatasetOperator,
)
from airflow_llmops.operators.data import dataset_asset
from airflow_llmops.schedules import reference_schedule

DATASET = "chatterbot-topics"
MODEL = "chatterbot-topics-classifier"
# What the ``task`` Param picks: a dialog generator and a chat assistant are each their own registered model on their
# own endpoint (a challenger is never judged against another task's champion, nor canaried next to it).
MODELS = {
    "classification": MODEL,
    "causal_lm": "chatterbot-dialog-generator",
    "chat": "chatterbot-chat-assistant",
}
ENDPOINTS = {"classification": DATASET, "causal_lm": "chatterbot-dialog", "chat": "chatterbot-chat"}
# The prepared data of each task is its own Asset and folder (dialog rows and conversations are not the classifier's
# rows: the drift monitor, which follows the classifier's dataset Asset, must never take them as its reference).
DATASETS = {"classification": DATASET, "causal_lm": "chatterbot-dialogs", "chat": "chatterbot-conversations"}


def by_task(values: Mapping[str, str]) -> str:
    """A template choosing ``values[params.task]`` (the classification value for any other task)."""
    expression = repr(values["classification"])
    for task, value in values.items():
        if task != "classification":
            expression = f"{value!r} if params.task == {task!r} else {expression}"
    return "{{ " + expression + " }}"


def dataset_alias(dag_id: str) -> AssetAlias:
    """The prepare task's outlet where the ``task`` Param picks the dataset: the event goes to the Asset of the dataset
    it prepared (``x-llmops://datasets/<name>``)."""
    return AssetAlias(f"llmops-{dag_id}-dataset")


def champion_alias(dag_id: str) -> AssetAlias:
    """The rollout's outlet: its promotion adds an event to ``model_alias_asset(<the task's model>)``."""
    return AssetAlias(f"llmops-{dag_id}-champion")


# Topics of the English corpus with enough distinct utterances to train and evaluate a classifier.
TOPICS = ",".join(
    (
        *("ai", "botprofile", "coding", "computers", "emotion", "food", "greetings", "humor", "literature"),
        *("money", "movies", "politics", "psychology", "science", "sports", "trivia"),
    )
)

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "llmops",
    # Tasks that talk to services (object store, MLflow, endpoints) retry with back-off.
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


STRATEGIES = ["all_at_once", "blue_green", "canary", "linear", "shadow"]


def reference_params(
    platform: str,
    *,
    platforms: list[str] | None = None,
    strategies: list[str] | None = None,
    tasks: list[str] | None = None,
) -> dict[str, Param]:
    """The typed Params of a manual run (*Trigger DAG w/ config*), the same on every platform.

    :param tasks: the values the ``task`` Param offers, the first the default (default: classification and
        causal_lm; every value offered must run end to end).
    """
    tasks = tasks or ["classification", "causal_lm"]
    return {
        "platform": Param(
            platform,
            type="string",
            enum=platforms or [platform],
            description="where training and serving run",
        ),
        "task": Param(
            tasks[0],
            type="string",
            enum=tasks,
            description="topic classification, dialog generation or a chat assistant",
        ),
        "model": Param("", type="string", description="Hugging Face id or path; empty: the task's offline default"),
        "dataset_source": Param(
            f"chatterbot://english?topics={TOPICS}",
            type="string",
            minLength=1,
            description="chatterbot://<language> or a file://, s3://, gs://, abfs:// URI",
        ),
        # The defaults fine-tune MiniLM past the TF-IDF + logistic-regression baseline on the test split
        # (bench/train.py measures both); a few minutes on two CPU cores. Set max_steps for a quick smoke run.
        "epochs": Param(6, type="number", exclusiveMinimum=0, description="passes over the training split"),
        "max_steps": Param(-1, type="integer", minimum=-1, description="-1: train for `epochs`; else stop here"),
        "learning_rate": Param(1.5e-4, type="number", exclusiveMinimum=0, maximum=1),
        "rollout_strategy": Param("canary", type="string", enum=strategies or STRATEGIES),
        "canary_steps": Param(
            [10, 50, 100],
            type="array",
            items={"type": "number"},
            description="new variant's traffic share per step, percent",
        ),
        "p95_latency_ms": Param(500, type="number", exclusiveMinimum=0),
        "bake_seconds": Param(20, type="number", minimum=0, description="how long each rollout step is watched"),
        "min_requests": Param(
            0,
            type="integer",
            minimum=0,
            description="requests a step needs before it is judged; 0 judges what came (the demo sends none)",
        ),
        "pii_action": Param(
            "redact", type="string", enum=["fail", "redact"], description="personal data found: stop, or redact"
        ),
        "max_error_rate": Param(0.01, type="number", minimum=0, maximum=1),
        "quantization_methods": Param(
            ["onnx_static_int8", "torch_dynamic_int8", "onnx_dynamic_int8"],
            type="array",
            items={"type": "string"},
            description="methods to try, each keeping in fp32 the layers int8 hurts most (accuracy-aware search); "
            "the fastest within max_quality_drop is kept",
        ),
        "max_quality_drop": Param(1.0, type="number", minimum=0, description="accuracy points quantization may lose"),
        "min_improvement": Param(
            0.0, type="number", description="accuracy the new model must gain over the champion to replace it"
        ),
    }


def reference_pipeline(
    *,
    dag_id: str,
    platform: str,
    doc_md: str,
    description: str,
    tags: list[str],
    schedule: str = "@daily",
    platforms: list[str] | None = None,
    platform_conn_id: str | None = None,
    train_options: Mapping[str, Any] | None = None,
    deploy_options: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    rollout: Mapping[str, Any] | None = None,
    params: Mapping[str, Param] | None = None,
    strategies: list[str] | None = None,
    tasks: list[str] | None = None,
    dataset: str | None = None,
    validation: Mapping[str, Any] | None = None,
    quantization: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> DAG:
    """The lifecycle as one DAG: plan → prepare → validate → train → quantize → evaluate → register → latest_only →
    deploy → rollout.

    :param platform: the platform training and serving run on (the ``platform`` Param's default).
    :param platforms: the values the ``platform`` Param offers (default: only ``platform``).
    :param platform_conn_id: the cloud connection of train and deploy (``aws`` for SageMaker).
    :param train_options: / :param deploy_options: the adapter's ``platform_options`` (templated JSON values).
    :param training: / :param rollout: fields added to (or replacing) the plan's training spec and rollout plan,
        e.g. ``{"distributed": {...}}`` for a two-instance job or ``{"native_guardrails": ...}``.
    :param params: extra Params (e.g. ones the ``training`` / ``rollout`` templates read).
    :param strategies: the rollout strategies the platform can run (the ``rollout_strategy`` Param's choices).
    :param tasks: the ``task`` Param's choices, the first the default (see :func:`reference_params`).
    :param dataset: the prepared dataset's name (and Asset) whatever the task; default: the task's own
        (:data:`DATASETS`).
    :param validation: / :param quantization: fields added to (or replacing) the validation and quantization specs.
    :param evaluation: arguments added to (or replacing) the ``evaluate`` task's (e.g. ``metric``,
        ``generation_rows``, ``max_new_tokens``; templated).
    """
    with DAG(
        dag_id=dag_id,
        description=description,
        schedule=reference_schedule(schedule),  # LLMOPS_REFERENCE_SCHEDULES=off: triggered runs only
        start_date=datetime(2026, 11, 1),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=tags,
        doc_md=doc_md,
        render_template_as_native_obj=True,
        params={
            **reference_params(platform, platforms=platforms, strategies=strategies, tasks=tasks),
            **dict(params or {}),
        },
    ) as dag:
        offered = tasks or ["classification", "causal_lm"]
        names = {task: dataset or DATASETS[task] for task in offered}
        if len(set(names.values())) == 1:  # one dataset: its name, and its Asset as the outlet
            dataset_name: str = next(iter(names.values()))
            dataset_outlet: Asset | AssetAlias = dataset_asset(dataset_name)
        else:  # the task Param picks it: the event goes through an alias to the chosen dataset's Asset
            dataset_name = by_task({"classification": DATASET, **names})
            dataset_outlet = dataset_alias(dag_id)
        cloud: dict[str, Any] = {"platform_conn_id": platform_conn_id} if platform_conn_id else {}
        train_wait: dict[str, Any] = {"deferrable": True} if platform != "local" else {}
        plan = PlanRunOperator(
            task_id="plan",
            platform="{{ params.platform }}",
            retries=0,
            dataset={
                "name": dataset_name,
                "source": "{{ params.dataset_source }}",
                "task": "{{ params.task }}",
            },
            training={
                "task": "{{ params.task }}",
                "model": "{{ params.model }}",
                "epochs": "{{ params.epochs }}",
                "max_steps": "{{ params.max_steps }}",
                "learning_rate": "{{ params.learning_rate }}",
                "warmup_ratio": 0.1,
                "max_seq_length": 64,
                # Two CPU processes (one per GPU where there are GPUs) x 8 = a global batch of 16.
                "per_device_batch_size": 8,
                "checkpoint_every_steps": 50,
                "log_every_steps": 10,
                **dict(training or {}),
            },
            rollout={
                "strategy": "{{ params.rollout_strategy }}",
                "traffic_steps": "{{ params.canary_steps if params.rollout_strategy == 'canary' else [] }}",
                "bake_seconds": "{{ params.bake_seconds }}",
                "slo": {
                    "p95_latency_ms": "{{ params.p95_latency_ms }}",
                    "max_error_rate": "{{ params.max_error_rate }}",
                    "min_requests": "{{ params.min_requests }}",
                },
                **dict(rollout or {}),
            },
        )
        prepare = PrepareDatasetOperator(
            task_id="prepare",
            dataset="{{ ti.xcom_pull(task_ids='plan')['specs']['dataset'] }}",
            tokenizer="{{ params.model or 'all-MiniLM-L6-v2' }}",
            outlets=[dataset_outlet],
        )
        validate = ValidateDatasetOperator(
            task_id="validate",
            dataset_uri="{{ ti.xcom_pull(task_ids='prepare')['dataset_uri'] }}",
            validation={
                "max_tokens": 128,
                "pii_action": "{{ params.pii_action }}",
                "max_quarantine_fraction": 0.02,
                **dict(validation or {}),
            },
        )
        train = TrainModelOperator(
            task_id="train",
            platform="{{ params.platform }}",
            spec="{{ ti.xcom_pull(task_ids='plan')['specs']['training'] }}",
            dataset_uri="{{ ti.xcom_pull(task_ids='validate')['dataset_uri'] }}",
            progress_interval=10,
            # A cloud job runs for hours: wait for it in the triggerer, not in a worker slot (local: as configured,
            # [operators] default_deferrable).
            **train_wait,
            execution_timeout=timedelta(hours=2),
            platform_options=train_options,
            **cloud,
        )
        quantize = QuantizeModelOperator(
            task_id="quantize",
            model_uri="{{ ti.xcom_pull(task_ids='train')['model_uri'] }}",
            dataset_uri="{{ ti.xcom_pull(task_ids='validate')['dataset_uri'] }}",
            spec={
                "methods": "{{ params.quantization_methods }}",
                "choose": "fastest_within_tolerance",
                "max_quality_drop": "{{ params.max_quality_drop }}",
                # Int8 everywhere first; over the tolerance, the layers that cost most go back to fp32 (searched on
                # the validation split, confirmed on the test split).
                "accuracy_aware": True,
                "max_trials": 12,
                "max_search_s": 240,
                **dict(quantization or {}),
            },
            fallback_to_source=True,  # no method within tolerance: ship full precision rather than nothing
        )
        evaluate = EvaluateModelOperator(
            task_id="evaluate",
            model_uri="{{ ti.xcom_pull(task_ids='quantize')['chosen_model_uri'] }}",
            dataset_uri="{{ ti.xcom_pull(task_ids='validate')['dataset_uri'] }}",
            registered_model_name=by_task(MODELS),
            min_improvement="{{ params.min_improvement }}",  # type: ignore[arg-type]  # rendered as a number
            **dict(evaluation or {}),
        )
        register = RegisterModelOperator(
            task_id="register",
            model_uri="{{ ti.xcom_pull(task_ids='quantize')['chosen_model_uri'] }}",
            dataset_uri="{{ ti.xcom_pull(task_ids='validate')['dataset_uri'] }}",
            training_run_id="{{ ti.xcom_pull(task_ids='train')['mlflow_run_id'] }}",
            registered_model_name=by_task(MODELS),
        )
        # Backfills and older intervals train, evaluate and register, but never touch the live endpoint.
        latest_only = LatestOnlyGateOperator(
            task_id="latest_only", model_version="{{ (ti.xcom_pull(task_ids='register') or {}).get('version', '') }}"
        )
        deploy = DeployModelOperator(
            task_id="deploy",
            platform="{{ params.platform }}",
            model_uri="{{ ti.xcom_pull(task_ids='register')['uri'] }}",
            endpoint_name=by_task(ENDPOINTS),
            rollout="{{ ti.xcom_pull(task_ids='plan')['specs']['rollout'] }}",
            platform_options=deploy_options,
            **cloud,
        )
        walk = RolloutOperator(
            task_id="rollout",
            rollout="{{ ti.xcom_pull(task_ids='deploy') }}",
            deferrable=True,
            poll_interval=2,
            # A retry re-attaches to the walk recorded on the endpoint (a killed worker, a lost deferral); a rollout
            # that was rolled back stays a verdict: the retry fails at once with its reason.
            retries=2,
            retry_delay=timedelta(seconds=5),
            retry_exponential_backoff=0,
            outlets=[champion_alias(dag_id)],
        )
        plan >> prepare >> validate >> train >> quantize >> evaluate >> register >> latest_only >> deploy >> walk
    return dag


CHAT_GATE_METRICS = ["perplexity", "rouge_l", "bleu", "chrf"]


def chat_params() -> dict[str, Param]:
    """The Params :func:`chat_pipeline` adds to (or replaces in) :func:`reference_params`."""
    return {
        "dataset_source": Param(
            f"chatterbot://english?topics={TOPICS}",
            type="string",
            minLength=1,
            description="chatterbot://<language>[?topics=...] (each dialog a conversation) or a JSONL/Parquet/CSV "
            "file:// (s3://, gs://, abfs://) URI of OpenAI-messages conversations",
        ),
        # The tiny GPT-2 is built from a config (no download): it learns the corpus from scratch, so it takes a
        # higher learning rate than a fine-tuned pretrained model would.
        "epochs": Param(3, type="number", exclusiveMinimum=0, description="passes over the training split"),
        "learning_rate": Param(5e-4, type="number", exclusiveMinimum=0, maximum=1),
        "quantization_methods": Param(
            ["torch_dynamic_int8"],
            type="array",
            items={"type": "string"},
            description="methods to try: torch_dynamic_int8 (GPT-2's Conv1D projections converted to Linear, so int8 "
            "reaches them) or onnx_dynamic_int8 (GPT-2 only: an ONNX Runtime graph with the KV cache as inputs and "
            "outputs, much faster on CPU; evaluated and served like a torch artifact, with streaming, sampling and "
            "continuous batching); onnx_static_int8 does not take causal LMs; the fastest within max_quality_drop is "
            "kept",
        ),
        "max_quality_drop": Param(
            10.0, type="number", minimum=0, description="percent perplexity increase quantization may cost"
        ),
        "gate_metric": Param(
            "perplexity",
            type="string",
            enum=CHAT_GATE_METRICS,
            description="what the evaluation gates on: perplexity on the assistant's tokens (lower is better) or "
            "ROUGE-L / BLEU / chrF of greedy answers to held-out conversations (higher is better)",
        ),
        "min_improvement": Param(
            0.0,
            type="number",
            description="how much better than the champion, in gate_metric units, the new model must be",
        ),
        "generation_rows": Param(
            32, type="integer", minimum=1, description="held-out conversations each model answers in evaluation"
        ),
        "max_new_tokens": Param(32, type="integer", minimum=1, description="the longest evaluated answer, tokens"),
    }


def chat_pipeline(
    *,
    dag_id: str,
    platform: str,
    doc_md: str,
    description: str,
    tags: list[str],
    schedule: str = "@daily",
    training: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    quantization: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    params: Mapping[str, Param] | None = None,
    **kwargs: Any,
) -> DAG:
    """The conversational-AI pipeline: :func:`reference_pipeline` with ``task="chat"`` only (its own dataset,
    registered model and endpoint), chat-sized sequences, torch int8 quantization and a generation-aware gate.
    ``training`` ... ``params`` are added to (or replace) the chat settings; other arguments go to
    :func:`reference_pipeline` as they are."""
    return reference_pipeline(
        dag_id=dag_id,
        platform=platform,
        doc_md=doc_md,
        description=description,
        tags=tags,
        schedule=schedule,
        tasks=["chat"],
        dataset=DATASETS["chat"],
        # Conversations are longer than topic rows: the whole rendered conversation (role markers included) counts.
        training={"max_seq_length": 128, **dict(training or {})},
        validation={"max_tokens": 256, **dict(validation or {})},
        # Int8 everywhere, measured on perplexity (no layer search: the tiny default has few layers to keep).
        quantization={"accuracy_aware": False, **dict(quantization or {})},
        evaluation={
            "metric": "{{ params.gate_metric }}",
            "generation_rows": "{{ params.generation_rows }}",
            "max_new_tokens": "{{ params.max_new_tokens }}",
            **dict(evaluation or {}),
        },
        params={**chat_params(), **dict(params or {})},
        **kwargs,
    )

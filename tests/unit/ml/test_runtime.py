"""The container runtime's reading of SageMaker's contract, without running anything: hosts, spec, torchrun's
arguments, the serve command line. ``tests/integration/test_runtime_contract.py`` runs it for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_llmops.ml.runtime import (
    Cluster,
    ContractError,
    OptMl,
    load_spec,
    plan_launch,
    serve_argv,
    torchrun_command,
)
from airflow_llmops.specs import TrainingSpec


def _opt_ml(tmp_path: Path, *, spec: object = None, hosts: list[str] | None = None, current: str = "algo-1") -> OptMl:
    opt = OptMl(tmp_path / "opt-ml")
    opt.config.mkdir(parents=True)
    value = TrainingSpec(max_steps=3).to_json() if spec is None else spec
    opt.hyperparameters.write_text(json.dumps({"llmops_spec": value, "sagemaker_region": '"eu-west-1"'}))
    config = {"current_host": current, "hosts": hosts or ["algo-1"], "network_interface_name": "eth0"}
    opt.resourceconfig.write_text(json.dumps(config))
    return opt


def test_opt_ml_root_comes_from_the_environment() -> None:
    assert OptMl.from_env({}).root == Path("/opt/ml")
    opt = OptMl.from_env({"LLMOPS_OPT_ML": "/tmp/x"})
    assert (opt.hyperparameters, opt.channel("dataset"), opt.failure) == (
        Path("/tmp/x/input/config/hyperparameters.json"),
        Path("/tmp/x/input/data/dataset"),
        Path("/tmp/x/output/failure"),
    )


def test_hosts_from_the_resource_config_and_the_sm_variables(tmp_path: Path) -> None:
    opt = _opt_ml(tmp_path, hosts=["algo-1", "algo-2"], current="algo-2")
    cluster = Cluster.read(opt, {})
    assert (cluster.hosts, cluster.nnodes, cluster.node_rank, cluster.num_gpus) == (("algo-1", "algo-2"), 2, 1, None)
    env = {"SM_HOSTS": '["algo-1","algo-2","algo-3"]', "SM_CURRENT_HOST": "algo-3", "SM_NUM_GPUS": "4"}
    assert Cluster.read(opt, env) == Cluster(("algo-1", "algo-2", "algo-3"), "algo-3", 4)
    assert Cluster.read(OptMl(tmp_path / "none"), {}) == Cluster(("algo-1",), "algo-1", None)
    with pytest.raises(ContractError, match="'algo-9' is not one of the hosts"):
        Cluster.read(opt, {"SM_CURRENT_HOST": "algo-9"})
    with pytest.raises(ContractError, match="SM_HOSTS must be a JSON list"):
        Cluster.read(opt, {"SM_HOSTS": "algo-1,algo-2"})


def test_the_spec_is_the_llmops_spec_hyperparameter(tmp_path: Path) -> None:
    spec = TrainingSpec(max_steps=7)
    assert load_spec(_opt_ml(tmp_path / "a", spec=spec.to_json())).max_steps == 7
    # The SageMaker Python SDK JSON-encodes each hyperparameter value; a stand-in may write an object.
    assert load_spec(_opt_ml(tmp_path / "b", spec=json.dumps(spec.to_json()))).max_steps == 7
    assert load_spec(_opt_ml(tmp_path / "c", spec=spec.to_dict())).max_steps == 7
    with pytest.raises(ContractError, match="not a valid TrainingSpec"):
        load_spec(_opt_ml(tmp_path / "d", spec='{"max_steps": -5}'))
    bare = _opt_ml(tmp_path / "e")
    bare.hyperparameters.write_text("{}")
    with pytest.raises(ContractError, match="has no 'llmops_spec'"):
        load_spec(bare)


def test_one_host_gets_a_loopback_rendezvous_and_the_container_paths(tmp_path: Path) -> None:
    opt = _opt_ml(tmp_path)
    opt.channel("dataset").mkdir(parents=True)
    spec = TrainingSpec(dataset_uri="s3://ignored/data", output_uri="s3://ignored/model")
    launch = plan_launch(spec, opt, Cluster.read(opt, {}), {})
    assert launch.spec.dataset_uri == str(opt.channel("dataset")) and launch.spec.output_uri == str(opt.model)
    assert launch.master_addr == "127.0.0.1" and launch.master_port > 0 and launch.nproc >= 1
    argv = torchrun_command(launch, Cluster.read(opt, {}), tmp_path / "spec.json", tmp_path / "job")
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"]
    assert argv[argv.index("--nnodes") + 1] == "1" and argv[argv.index("--node_rank") + 1] == "0"
    assert argv[-6:] == [
        "-m",
        "airflow_llmops.ml.train",
        "--spec",
        str(tmp_path / "spec.json"),
        "--job-dir",
        str(tmp_path / "job"),
    ]


def test_several_hosts_rendezvous_at_the_first_one(tmp_path: Path) -> None:
    opt = _opt_ml(tmp_path, hosts=["algo-1", "algo-2"], current="algo-2")
    cluster = Cluster.read(opt, {"SM_NUM_GPUS": "0"})
    spec = TrainingSpec(dataset_uri="/data", distributed={"nproc_per_node": 2})
    launch = plan_launch(spec, opt, cluster, {})
    assert (launch.master_addr, launch.master_port, launch.nproc) == ("algo-1", 29500, 2)
    d = launch.spec.distributed
    assert (d.nnodes, d.node_rank, d.rdzv_endpoint, d.nproc_per_node) == (2, 1, "algo-1:29500", 2)
    assert TrainingSpec.from_json(launch.spec.to_json()) == launch.spec  # what train.py reads validates
    assert launch.spec.dataset_uri == "/data"  # no channel folder: the spec's own dataset
    overridden = plan_launch(spec, opt, Cluster.read(opt, {"SM_NUM_GPUS": "8"}), {
        "LLMOPS_MASTER_ADDR": "10.0.0.5", "LLMOPS_MASTER_PORT": "7777"
    })  # fmt: skip
    assert (overridden.master_addr, overridden.master_port, overridden.nproc) == ("10.0.0.5", 7777, 8)
    argv = torchrun_command(overridden, cluster, Path("s"), Path("j"))
    assert argv[argv.index("--master_addr") + 1 : argv.index("--master_addr") + 4] == [
        "10.0.0.5",
        "--master_port",
        "7777",
    ]
    with pytest.raises(ContractError, match="no dataset"):
        plan_launch(TrainingSpec(), opt, cluster, {})


def test_serve_listens_on_the_platforms_port_with_the_extracted_model(tmp_path: Path) -> None:
    opt = tmp_path / "opt-ml"
    env = {"LLMOPS_OPT_ML": str(opt)}
    with pytest.raises(ContractError, match=r"no model to serve: .* is missing"):
        serve_argv([], env)
    (opt / "model").mkdir(parents=True)
    with pytest.raises(ContractError, match=r"is empty.*ModelDataUrl"):
        serve_argv([], env)
    (opt / "model" / "config.json").write_text("{}")
    assert serve_argv([], env) == ["--host", "0.0.0.0", "--port", "8080", "--model", f"model={opt / 'model'}"]
    named = serve_argv([], {**env, "LLMOPS_VARIANT_NAME": "AllTraffic", "LLMOPS_SERVE_HOST": "127.0.0.1"})
    assert named[:2] == ["--host", "127.0.0.1"] and named[-1] == f"AllTraffic={opt / 'model'}"
    ports = {"LLMOPS_SERVE_PORT": "7000", "SAGEMAKER_BIND_TO_PORT": "7100", "AIP_HTTP_PORT": "7200"}
    assert serve_argv([], {**env, **ports})[3] == "7200"
    assert serve_argv([], {**env, "LLMOPS_SERVE_PORT": "7000", "SAGEMAKER_BIND_TO_PORT": "7100"})[3] == "7100"
    assert serve_argv([], {**env, "LLMOPS_SERVE_PORT": "7000"})[3] == "7000"
    # Variants named on the command line: no model folder needed, and they come last (the last value wins).
    assert serve_argv(["--model", "a=echo://"], {"LLMOPS_OPT_ML": str(tmp_path / "none")})[-2:] == [
        "--model",
        "a=echo://",
    ]

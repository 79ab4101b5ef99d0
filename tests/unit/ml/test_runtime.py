"""The container runtime's reading of SageMaker's and Vertex AI's contracts, without running anything: hosts,
spec, torchrun's arguments, checkpoint mirroring, the serve command line. ``tests/integration/test_runtime_contract.py``
and ``test_runtime_vertex.py`` run it for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import require_module

from airflow_llmops.ml.runtime import (
    CheckpointSync,
    Cluster,
    ContractError,
    OptMl,
    VertexCluster,
    VertexJob,
    is_vertex,
    load_spec,
    load_vertex_spec,
    parse_cluster_spec,
    parse_tuned_args,
    plan_launch,
    plan_vertex_launch,
    serve_argv,
    stage_dataset,
    torchrun_command,
    write_result,
)
from airflow_llmops.ml.training.jobdir import JobDir
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


# ---- Vertex AI ----------------------------------------------------------------------------------------------------
def _cluster_spec(task: str, index: int, **pools: list[str]) -> str:
    return json.dumps({"cluster": pools, "task": {"type": task, "index": index}, "job": '{"workerPoolSpecs": []}'})


def test_vertex_is_detected_by_its_variables() -> None:
    assert is_vertex({"CLUSTER_SPEC": _cluster_spec("workerpool0", 0, workerpool0=["h:2222"])})
    assert is_vertex({"AIP_MODEL_DIR": "gs://bucket/out/model/"})
    assert not is_vertex({})
    assert not is_vertex(
        {"SM_HOSTS": '["algo-1"]', "LLMOPS_OPT_ML": "/tmp/x", "AIP_HTTP_PORT": "8080", "CLUSTER_SPEC": ""}
    )


def test_cluster_spec_of_one_pool() -> None:
    spec = _cluster_spec("workerpool0", 0, workerpool0=["cmle-training-workerpool0-ab12-0:2222"])
    cluster = parse_cluster_spec(spec)
    assert (cluster.hosts, cluster.nnodes, cluster.node_rank) == (("cmle-training-workerpool0-ab12-0:2222",), 1, 0)
    assert cluster.master_host == "cmle-training-workerpool0-ab12-0"
    assert (cluster.pool, cluster.index) == ("workerpool0", 0)
    # No CLUSTER_SPEC (AIP_MODEL_DIR alone): one replica.
    assert parse_cluster_spec(None) == VertexCluster(("localhost",), "localhost")


def test_cluster_spec_of_two_pools_ranks_the_chief_pool_first() -> None:
    pools = {"workerpool0": ["chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]}
    ranks = [parse_cluster_spec(_cluster_spec(t, i, **pools)).node_rank for t, i in [("workerpool0", 0),
             ("workerpool1", 0), ("workerpool1", 1)]]  # fmt: skip
    assert ranks == [0, 1, 2]
    second = parse_cluster_spec(_cluster_spec("workerpool1", 1, **pools))
    assert (second.hosts, second.current_host, second.nnodes, second.master_host) == (
        ("chief:2222", "w0:2222", "w1:2222"),
        "w1:2222",
        3,
        "chief",
    )
    # A stand-in may run every replica on one host: entries differ by port only, the rank still comes from the task.
    local = {"workerpool0": ["127.0.0.1:2222"], "workerpool1": ["127.0.0.1:2223"]}
    assert parse_cluster_spec(_cluster_spec("workerpool1", 0, **local)).node_rank == 1
    assert parse_cluster_spec(_cluster_spec("workerpool0", 0, workerpool0=["[fd00::1]:2222"])).master_host == "fd00::1"
    with pytest.raises(ContractError, match="workerpool0 and workerpool1 only"):
        parse_cluster_spec(_cluster_spec("workerpool2", 0, workerpool0=["a:1"], workerpool2=["r:1"]))
    with pytest.raises(ContractError, match=r"task\.index 2 is not a replica of workerpool1"):
        parse_cluster_spec(_cluster_spec("workerpool1", 2, **pools))
    with pytest.raises(ContractError, match="no replica in workerpool0"):
        parse_cluster_spec(_cluster_spec("workerpool1", 0, workerpool1=["w:1"]))
    with pytest.raises(ContractError, match="CLUSTER_SPEC is not JSON"):
        parse_cluster_spec("workerpool0=a:1")


def test_the_torchrun_command_of_a_two_replica_job() -> None:
    pools = {"workerpool0": ["chief:2222"], "workerpool1": ["worker:2222"]}
    cluster = parse_cluster_spec(_cluster_spec("workerpool1", 0, **pools))
    spec = TrainingSpec(distributed={"nproc_per_node": 2})
    launch = plan_vertex_launch(spec, cluster, {}, dataset="/data", output="gs://bucket/model/")
    assert (launch.master_addr, launch.master_port, launch.nproc) == ("chief", 29500, 2)  # not Vertex's 2222
    d = launch.spec.distributed
    assert (d.nnodes, d.node_rank, d.rdzv_endpoint) == (2, 1, "chief:29500")
    assert (launch.spec.dataset_uri, launch.spec.output_uri) == ("/data", "gs://bucket/model/")
    argv = torchrun_command(launch, cluster, Path("/w/spec.json"), Path("/w/job"))
    assert argv[2:] == [
        "torch.distributed.run",
        "--nproc_per_node", "2",
        "--nnodes", "2",
        "--node_rank", "1",
        "--max_restarts", "0",
        "--master_addr", "chief",
        "--master_port", "29500",
        "-m", "airflow_llmops.ml.train", "--spec", "/w/spec.json", "--job-dir", "/w/job",
    ]  # fmt: skip
    env = {"LLMOPS_MASTER_ADDR": "10.0.0.7", "LLMOPS_MASTER_PORT": "7777"}
    overridden = plan_vertex_launch(spec, cluster, env, dataset="/data", output=None)
    assert overridden.spec.distributed.rdzv_endpoint == "10.0.0.7:7777"
    with pytest.raises(ContractError, match="LLMOPS_MASTER_PORT must be a port number"):
        plan_vertex_launch(spec, cluster, {"LLMOPS_MASTER_PORT": "2222x"}, dataset="/data", output=None)


def test_the_spec_comes_from_llmops_spec_with_the_trials_arguments() -> None:
    env = {"LLMOPS_SPEC": TrainingSpec(max_steps=7, learning_rate=1e-4).to_json()}
    assert load_vertex_spec(env).learning_rate == 1e-4
    tuned = load_vertex_spec(env, ["--learning_rate=0.0003", "--max_steps", "9", "--per-device-batch-size=4"])
    assert (tuned.learning_rate, tuned.max_steps, tuned.per_device_batch_size) == (0.0003, 9, 4)
    assert load_vertex_spec({"LLMOPS_SPEC": json.dumps(env["LLMOPS_SPEC"])}).max_steps == 7  # JSON-encoded text
    assert parse_tuned_args(["--lora.r=8", "--learning_rate", "1e-5"]) == {"lora.r": "8", "learning_rate": "1e-5"}
    with pytest.raises(ContractError, match="'no_such_field' is not a TrainingSpec field"):
        load_vertex_spec(env, ["--no_such_field=1"])
    with pytest.raises(ContractError, match="--name=value, got 'oops'"):
        parse_tuned_args(["oops"])
    with pytest.raises(ContractError, match="--learning_rate has no value"):
        parse_tuned_args(["--learning_rate"])
    with pytest.raises(ContractError, match="LLMOPS_SPEC is not set"):
        load_vertex_spec({})
    with pytest.raises(ContractError, match="LLMOPS_SPEC is not a valid TrainingSpec"):
        load_vertex_spec({"LLMOPS_SPEC": '{"learning_rate": -1}'})


def test_each_replica_has_its_own_work_folder_and_a_local_checkpoint_dir_is_linked(tmp_path: Path) -> None:
    pools = {"workerpool0": ["a:1"], "workerpool1": ["b:1"]}
    env = {"LLMOPS_WORK_DIR": str(tmp_path / "work"), "AIP_CHECKPOINT_DIR": f"file://{tmp_path / 'ckpt'}"}
    chief = VertexJob.from_env(env, parse_cluster_spec(_cluster_spec("workerpool0", 0, **pools)))
    worker = VertexJob.from_env(env, parse_cluster_spec(_cluster_spec("workerpool1", 0, **pools)))
    assert (chief.work, worker.work) == (tmp_path / "work" / "workerpool0-0", tmp_path / "work" / "workerpool1-0")
    job = chief.prepare()
    assert not chief.checkpoints_remote
    assert job.checkpoints.is_symlink() and job.checkpoints.resolve() == (tmp_path / "ckpt").resolve()
    default = VertexJob.from_env({"CLOUD_ML_JOB_ID": "123/4"}, parse_cluster_spec(None))
    assert default.work.parts[-3:] == ("llmops-runtime", "123_4", "workerpool0-0")
    remote = VertexJob(tmp_path / "r", checkpoint_dir="gs://bucket/ckpt/")
    assert remote.checkpoints_remote and remote.prepare().checkpoints.is_dir()


def test_a_remote_dataset_is_downloaded_and_a_local_one_used_in_place(tmp_path: Path) -> None:
    fsspec = require_module("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/llmops-test-{tmp_path.name}/data"
    fs.pipe({f"{root}/train.parquet": b"t", f"{root}/validation.parquet": b"v", f"{root}/manifest.json": b"{}"})
    local = stage_dataset(f"memory://{root}", tmp_path / "dl")
    assert local == str(tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "manifest.json",
        "train.parquet",
        "validation.parquet",
    ]
    assert stage_dataset(f"file://{tmp_path / 'dl'}", tmp_path / "unused") == str(tmp_path / "dl")
    with pytest.raises(ContractError, match="the dataset memory:///nothing/here is missing or empty"):
        stage_dataset("memory:///nothing/here", tmp_path / "dl2")
    with pytest.raises(ContractError, match=r"does not exist .*LLMOPS_DATASET_URI"):
        stage_dataset(str(tmp_path / "absent"), tmp_path / "dl3")


def _checkpoint(folder: Path, step: int, *, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * step)
    (path / "optimizer.pt").write_bytes(b"o")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_checkpoints_are_mirrored_in_a_remote_checkpoint_dir(tmp_path: Path) -> None:
    fsspec = require_module("fsspec")
    fs = fsspec.filesystem("memory")
    remote = f"memory:///llmops-test-{tmp_path.name}/checkpoints/"
    base = remote.removeprefix("memory://").rstrip("/")

    first = JobDir(tmp_path / "first")
    _checkpoint(first.checkpoints, 3)
    _checkpoint(first.checkpoints, 6)
    _checkpoint(first.checkpoints, 9, complete=False)  # being written: not uploaded
    chief = CheckpointSync(first, remote, chief=True)
    assert chief.restore() is None  # nothing there yet
    assert chief.push() == ["checkpoint-3", "checkpoint-6"]
    assert chief.push() == []  # already there
    assert fs.exists(f"{base}/checkpoint-6/trainer_state.json") and not fs.exists(f"{base}/checkpoint-9")

    # A preempted replica restarts on a fresh machine: the newest complete checkpoint comes back.
    second = JobDir(tmp_path / "second")
    second.checkpoints.mkdir(parents=True)
    restarted = CheckpointSync(second, remote, chief=True)
    assert restarted.restore() == "checkpoint-6"
    latest = second.latest_checkpoint()
    assert latest is not None and latest.step == 6
    assert (latest.path / "model.safetensors").read_bytes() == b"w" * 6
    # It trains on; the Trainer rotates checkpoint-6 away: the remote mirror follows once the new ones are up.
    _checkpoint(second.checkpoints, 12)
    _checkpoint(second.checkpoints, 15)
    shutil.rmtree(second.checkpoints / "checkpoint-6")
    assert restarted.push() == ["checkpoint-12", "checkpoint-15"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)) == ["checkpoint-12", "checkpoint-15"]

    # Another replica adds its own RNG state to the checkpoints the chief uploaded, and nothing else.
    other = JobDir(tmp_path / "other")
    (other.checkpoints / "checkpoint-15").mkdir(parents=True)
    (other.checkpoints / "checkpoint-15" / "rng_state_1.pth").write_bytes(b"r")
    (other.checkpoints / "checkpoint-18").mkdir(parents=True)
    (other.checkpoints / "checkpoint-18" / "rng_state_1.pth").write_bytes(b"r")
    assert CheckpointSync(other, remote, chief=False).push() == ["checkpoint-15"]
    assert fs.exists(f"{base}/checkpoint-15/rng_state_1.pth") and not fs.exists(f"{base}/checkpoint-18")


def test_serve_takes_vertex_ais_storage_uri(tmp_path: Path) -> None:
    model = tmp_path / "artifacts"
    env = {"AIP_STORAGE_URI": f"file://{model}", "AIP_HTTP_PORT": "8081", "LLMOPS_OPT_ML": str(tmp_path / "none")}
    with pytest.raises(ContractError, match=r"no model to serve: AIP_STORAGE_URI=.* is missing"):
        serve_argv([], env)
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert serve_argv([], env) == ["--host", "0.0.0.0", "--port", "8081", "--model", f"model={model}"]
    # AIP_STORAGE_URI wins over LLMOPS_MODEL_URI; variants on the command line win over both.
    assert serve_argv([], {**env, "LLMOPS_MODEL_URI": "models:/clf/3"})[-1] == f"model={model}"
    assert serve_argv(["--model", "a=echo://"], env)[-2:] == ["--model", "a=echo://"]
    fsspec = require_module("fsspec")
    root = f"/llmops-test-{tmp_path.name}/model"
    fsspec.filesystem("memory").pipe({f"{root}/config.json": b"{}", f"{root}/tokenizer/vocab.txt": b"a"})
    remote_env = {"AIP_STORAGE_URI": f"memory://{root}", "LLMOPS_WORK_DIR": str(tmp_path / "work")}
    argv = serve_argv([], remote_env)
    local = tmp_path / "work" / "serving-model"
    assert argv[-1] == f"model={local}" and (local / "tokenizer" / "vocab.txt").read_text() == "a"


def test_the_result_record_is_written_locally_or_with_fsspec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_result((tmp_path / "out" / "result.json").as_uri(), {"state": "succeeded", "metrics": {"loss": 0.5}})
    assert json.loads((tmp_path / "out" / "result.json").read_text())["metrics"] == {"loss": 0.5}
    fsspec = require_module("fsspec")
    uri = f"memory:///llmops-test-{tmp_path.name}/llmops/result.json"
    write_result(uri, {"state": "failed", "message": "boom"})
    with fsspec.open(uri, "r") as handle:
        assert json.load(handle) == {"message": "boom", "state": "failed"}
    write_result("nosuchscheme://x/result.json", {"state": "failed"})  # best effort: reported, not raised
    assert "cannot write the result nosuchscheme://x/result.json" in capsys.readouterr().out

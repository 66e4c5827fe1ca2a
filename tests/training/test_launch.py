"""pipeline/training/distributed/launch.py: the torchrun command the train stage becomes, from the environment as
torchrun and SLURM set it (one host, several hosts through a c10d rendezvous), and one line for a
topology that cannot run. The runs themselves: tests/training/test_ddp.py (one host) and
tests/scale/test_nodes.py (two hosts as two network namespaces)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import PipelineError
from pipeline.training.distributed.launch import torchrun_arguments
from tests.conftest import in_process

STAGE = ["-m", "pipeline.train", "--out", "m"]


def test_one_process_trains_here_and_a_worker_is_left_alone():
    assert torchrun_arguments({}, ["--out", "m"]) is None
    assert torchrun_arguments({"NPROC_PER_NODE": "1", "NNODES": "1"}, []) is None
    assert torchrun_arguments({"NPROC_PER_NODE": "4", "LOCAL_RANK": "0"}, []) is None  # torchrun's own worker


def test_the_gpus_of_one_host():
    assert torchrun_arguments({"NPROC_PER_NODE": "8"}, ["--out", "m"]) == ["--standalone", "--nproc_per_node=8",
                                                                           *STAGE]


def test_several_hosts_meet_at_node_0():
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "RDZV_ENDPOINT": "10.0.0.1:29400",
           "RDZV_ID": "run7", "NODE_ADDR": "10.0.0.2"}
    assert torchrun_arguments(env, ["--out", "m"]) == [
        "--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400",
        "--rdzv_id=run7", "--rdzv_conf=is_host=0,join_timeout=1800", "--local_addr=10.0.0.2", *STAGE]
    first = torchrun_arguments({**env, "NODE_RANK": "0"}, [])
    assert "--rdzv_conf=is_host=1,join_timeout=1800" in first and "--node_rank=0" in first
    assert "--rdzv_conf=is_host=0,join_timeout=60" in torchrun_arguments({**env, "RDZV_TIMEOUT": "60"}, [])


def test_slurm_names_the_nodes_the_rank_and_the_run():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_ID": "4242", "RDZV_ENDPOINT": "gpu-a01:29400"}
    arguments = torchrun_arguments(env, [])
    assert {"--nnodes=3", "--node_rank=2", "--rdzv_id=4242", "--nproc_per_node=1"} <= set(arguments)


@pytest.mark.parametrize("env, says", [
    ({"NNODES": "two"}, "NNODES='two' is not a node count"),
    ({"NNODES": "2", "NODE_RANK": "-1", "RDZV_ENDPOINT": "h:1"}, "NODE_RANK='-1' is not a node rank"),
    ({"NNODES": "2", "NODE_RANK": "2", "RDZV_ENDPOINT": "h:1"}, "NODE_RANK=2 with NNODES=2: ranks go from 0 to 1"),
    ({"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT=host:port"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "10.0.0.1"}, "needs RDZV_ENDPOINT=host:port"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0' is not a process count"),
])
def test_a_topology_that_cannot_run_is_one_line(env, says):
    with pytest.raises(PipelineError, match=says):
        torchrun_arguments(env, [])


def test_the_stage_refuses_it_before_anything_starts(project, monkeypatch):
    from pipeline.train import main

    monkeypatch.setenv("NNODES", "2")
    result = in_process(main, [], project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: NNODES=2 needs RDZV_ENDPOINT=host:port, where the nodes meet (node 0's address, e.g. "
        "10.0.0.1:29400); got ''"]
    assert not (project / "models").exists()

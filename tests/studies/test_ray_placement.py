"""Ray placement: each actor's request sized from its model, and requests no node can hold refused up front."""

import pytest

from outliers.errors import InvalidArgumentError
from studies.ray_backend import (
    GIB,
    MEMORY_FACTOR,
    PROCESS_BYTES,
    ActorRequest,
    actor_request,
    check_schedulable,
)

NODE = {"CPU": 4.0, "GPU": 0.0, "memory": 16 * GIB}


def test_request_grows_with_the_model_and_overrides_replace_it():
    small, large = actor_request("a", 10**9), actor_request("b", 10 * 10**9)
    assert small.memory == int(MEMORY_FACTOR * 10**9) + PROCESS_BYTES
    assert large.memory - small.memory == int(MEMORY_FACTOR * 9 * 10**9)
    assert small.options() == {"num_cpus": 1.0, "num_gpus": 0.0, "memory": small.memory}
    given = actor_request("a", 10**9, memory_gib=3, num_gpus=1)
    assert (given.memory, given.num_gpus) == (3 * GIB, 1.0)
    for bad in ({"memory_gib": 0}, {"num_gpus": -1}, {"factor": 0}):
        with pytest.raises(InvalidArgumentError, match="actor placement for a"):
            actor_request("a", 10**9, **bad)


@pytest.mark.parametrize(
    ("request_", "nodes", "fits"),
    [
        pytest.param(ActorRequest("m", GIB, memory=8 * GIB), [NODE], True, id="fits"),
        pytest.param(ActorRequest("m", GIB, memory=20 * GIB), [NODE], False, id="memory"),
        pytest.param(ActorRequest("m", GIB, num_gpus=1, memory=GIB), [NODE], False, id="no-gpu"),
        pytest.param(ActorRequest("m", GIB, num_cpus=8, memory=GIB), [NODE], False, id="cpus"),
        pytest.param(ActorRequest("m", GIB, memory=24 * GIB), [NODE, NODE], False, id="two-halves-are-not-one-node"),
        pytest.param(
            ActorRequest("m", GIB, num_gpus=1, memory=24 * GIB),
            [NODE, {"CPU": 8.0, "GPU": 2.0, "memory": 64 * GIB}],
            True,
            id="the-big-node",
        ),
    ],
)
def test_check_schedulable(request_, nodes, fits):
    if fits:
        check_schedulable([request_], nodes)
        return
    with pytest.raises(InvalidArgumentError, match=r"model m \(1.00 GiB of float32 weights\) needs an actor with"):
        check_schedulable([request_], nodes)


def test_the_message_names_the_numbers():
    with pytest.raises(InvalidArgumentError) as e:
        check_schedulable([actor_request("facebook/opt-13b", 52 * 10**9)], [NODE])
    msg = str(e.value)
    assert "facebook/opt-13b (48.43 GiB" in msg and "97.9 GiB memory" in msg and "the largest: 4 CPU" in msg
    with pytest.raises(InvalidArgumentError, match="no live node"):
        check_schedulable([actor_request("m", 1)], [])


def test_a_study_that_no_node_can_hold_fails_before_any_actor(tmp_path, model_dir, text_file, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from studies.config import load_config
    from studies.runner import run_study

    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "big"\nmodels = ["{model_dir("llama")}"]\ncorpora = ["{text_file}"]\n'
        'methods = ["llm.int8"]\nthresholds = [6]\nwindow = 32\nmax_windows = 1\nactor_memory_gib = 100000\n'
    )
    cfg = load_config(path)
    assert cfg.actor_memory_gib == 100000
    ray.init(num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(InvalidArgumentError, match=r"needs an actor with 1 CPU, 100000.0 GiB memory"):
            run_study(cfg, tmp_path / "out", progress=False, backend="ray")
        assert ray.available_resources().get("CPU") == 1  # no actor was started to wait forever
    finally:
        ray.shutdown()

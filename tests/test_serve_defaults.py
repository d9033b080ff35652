from __future__ import annotations

from dotllm import serve_defaults
from dotllm.model_check import looks_like_path, model_problem


def test_cpu_environment_defaults_fill_only_what_is_unset():
    env = {"HF_HUB_OFFLINE": "0"}
    added = serve_defaults.apply_environment(env, on_gpu=False)
    assert added == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert env == {"HF_HUB_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}


def test_gpu_gets_no_cpu_defaults():
    env: dict[str, str] = {}
    assert serve_defaults.apply_environment(env, on_gpu=True) == {}
    assert env == {}
    assert serve_defaults.option_defaults(on_gpu=True) == {}
    assert serve_defaults.option_defaults(on_gpu=False) == {"dtype": "float32"}


def test_one_gpu_runs_its_worker_in_a_process_of_its_own():
    backend = serve_defaults.executor_backend
    assert backend(on_gpu=True, given=None, world_size=1) == "mp"
    assert backend(on_gpu=True, given="uni", world_size=1) == "uni"  # the user's wins
    assert backend(on_gpu=True, given=None, world_size=2) is None  # vLLM's (mp or ray)
    assert backend(on_gpu=False, given=None, world_size=1) is None  # CPU: vLLM's


def test_device_states_on_a_gpu_unless_the_user_says():
    defaults = serve_defaults.dotllm_defaults
    assert defaults(on_gpu=True, environ={}) == {"dotllm_device_states_mib": 512}
    assert defaults(on_gpu=True, environ={"DOTLLM_DEVICE_STATES_MIB": "0"}) == {}
    assert defaults(on_gpu=False, environ={}) == {}


def test_looks_like_path():
    assert looks_like_path("/models/x")
    assert looks_like_path("./x")
    assert looks_like_path("~/x")
    assert looks_like_path("a/b/c")
    assert not looks_like_path("org/name")
    assert not looks_like_path("gpt2")


def test_model_problem(tmp_path):
    assert model_problem(str(tmp_path)) is None
    missing = str(tmp_path / "nope")
    assert model_problem(missing) == f"model path {missing!r} does not exist"
    offline = model_problem("org/name", environ={"HF_HUB_OFFLINE": "1"})
    assert offline and "Hugging Face cache" in offline
    assert model_problem("not a valid id", environ={"HF_HUB_OFFLINE": "1"})


def test_a_hub_that_cannot_be_reached_is_said_before_vllm_tries(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
    problem = model_problem("org/name", environ={})
    assert problem and "'org/name'" in problem and "the Hub cannot be reached" in problem


def test_cpu_workers_split_the_cpus_where_numa_nodes_are_too_few():
    env: dict[str, str] = {}
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    assert serve_defaults.bind_cpu_workers(env, 2, numa_nodes=1, cpus=[0, 1, 2, 3]) == bind
    assert env == bind
    assert serve_defaults.bind_cpu_workers({}, 2, numa_nodes=1, cpus=[0, 1]) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert serve_defaults.bind_cpu_workers({}, 1, numa_nodes=1, cpus=[0, 1]) == {}
    assert serve_defaults.bind_cpu_workers({}, 2, numa_nodes=2, cpus=[0, 1]) == {}  # vLLM's
    assert serve_defaults.bind_cpu_workers({}, 4, numa_nodes=1, cpus=[0, 1]) == {}
    mine = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert serve_defaults.bind_cpu_workers(mine, 2, numa_nodes=1, cpus=[0, 1, 2]) == {}
    assert mine == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

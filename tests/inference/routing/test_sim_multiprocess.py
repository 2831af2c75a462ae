"""The multi-process routing simulation runs and orders policies sensibly."""
from dataclasses import replace

from inference.routing import CacheAware, policy_for
from inference.routing.sim_multiprocess import Cluster, Workload, main, scenarios_run, simulate

TINY = replace(Workload(), tenants=4, conversations=30, conversations_per_s=1.0,
               system_chars=(500, 2000), user_chars=(50, 300), reply_chars=(50, 300))
CLUSTER = replace(Cluster(), backend_cache_chars=20_000)


def test_scenarios_run_on_a_tiny_workload():
    results = scenarios_run(TINY, CLUSTER)
    labels = [result.label for result in results]
    assert "cache_aware / 4 / shared tree" in labels
    for result in results:
        assert result.requests > 30
        assert 0.0 <= result.hit_rate <= 1.0
        assert 0.0 <= result.ttft_mean_s <= result.ttft_p99_s
    rates = {result.label: result.hit_rate for result in results}
    assert rates["cache_aware / 1 / per process"] > rates["round_robin / 1 / per process"]


def test_simulation_is_deterministic():
    def run() -> float:
        return simulate(label="x", policies=[CacheAware(max_tree_chars=20_000)] * 2, workload=TINY,
                        cluster=CLUSTER).hit_rate

    assert run() == run()
    assert simulate(label="rr", policies=[policy_for("round_robin")], workload=TINY, cluster=CLUSTER).requests > 0


def test_command_line(capsys):
    main(["--conversations", "10", "--tenants", "3", "--cache-chars", "20000", "--processes", "1", "2"])
    out = capsys.readouterr().out
    assert "hit rate" in out and "cache_aware / 2 / shared tree" in out


def test_shared_homes_recover_what_per_process_routing_loses():
    workload = replace(Workload(), conversations=150)

    def hit_rate(**options) -> float:
        return simulate(label="x", policies=[CacheAware() for _ in range(4)], workload=workload,
                        cluster=Cluster(), **options).hit_rate

    alone, with_homes = hit_rate(), hit_rate(homes={})
    assert with_homes > alone + 0.03

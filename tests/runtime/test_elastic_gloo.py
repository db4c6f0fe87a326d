"""Elastic EP on real gloo processes: 4 -> 2, 4 -> 3 (a middle rank leaves), 2 -> 4, and a
leaving rank that dies before handing off, with two models in one run: one loses the
experts only the dead rank held, the other loses nothing thanks to replicas.

After each reconfiguration, every slot on every remaining rank holds the weights of the
expert its map names (joining ranks start from poisoned weights, so theirs came from the
transfer), every logical expert has a replica, the maps agree across ranks, and the
remaining ranks' histories are identical.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm import (
    ElasticGroups,
    EplbConfig,
    EplbRuntime,
    ExpertsLost,
    Placement,
    RebalanceFailed,
)
from eplb_fsm.testing import Faults, TaggedMoEModel, inject_faults, run_ranks
from eplb_fsm.transfer import TransferEngine

L, E, LOCAL = 2, 6, 3  # 3 slots per rank: 2 ranks hold 6 slots (no spare), 4 hold 12
TIMEOUT_S = 3.0


def _config(ranks: int) -> EplbConfig:
    return EplbConfig(window_size=8, step_interval=10**6, num_redundant_experts=ranks * LOCAL - E,
                      readiness_lag=1, peer_timeout_s=TIMEOUT_S)


def _feed(model: TaggedMoEModel, step: int) -> None:
    l2p = model.logical_to_physical_map.numpy()
    count = model.logical_replica_count.numpy()
    load = np.arange(1, E + 1) ** 2
    for layer in range(L):
        for expert in range(E):
            slots = l2p[layer, expert, :count[layer, expert]]
            model.expert_load_view[layer, slots] += int(load[expert]) // len(slots) + step % 2


def _state(rt: EplbRuntime, model: TaggedMoEModel, name: str = "main") -> dict[str, Any]:
    p = rt.placement(name)
    return {
        "wrong_slots": model.wrong_slots(p.physical_to_logical),
        "maps_agree": bool(np.array_equal(model.logical_to_physical_map.numpy(),
                                          p.logical_to_physical)
                           and np.array_equal(model.logical_replica_count.numpy(),
                                              p.replica_count)),
        "min_replicas": int(p.replica_count.min()),
        "placement": p.physical_to_logical.tolist(),
        "history": [tuple(r) for r in rt.history(name)],
        "step": rt.step_count,
        "phase": rt.phase(name),
    }


def _rank_main(rank: int, world: int, old: list[int], new: list[int],
               initial: dict[str, list[int]] | None,
               die: bool | tuple[int, ...]) -> dict[str, Any]:
    """One process; `initial` maps model name -> initial placement (default: one model,
    "main", in the default layout). Results are per model when `initial` is given."""
    names = list(initial) if initial is not None else ["main"]

    async def main() -> dict[str, Any]:
        old_group = dist.new_group(old, backend="gloo")  # every process creates every group
        old_cpu = dist.new_group(old, backend="gloo")
        groups = ElasticGroups.create(old, new)
        result: dict[str, Any] = {"role": groups.role(rank)}
        if rank in old:
            rt = EplbRuntime(_config(len(old)), group=old_group, cpu_group=old_cpu)
            models = {}
            for name in names:
                models[name] = TaggedMoEModel(old.index(rank), len(old), L, E,
                                              len(old) * LOCAL - E)
                placement = None
                if initial is not None:
                    placement = Placement(np.tile(initial[name], (L, 1)), E)
                    _retag(models[name], placement)
                rt.add_model(models[name], name, placement=placement)
            if (rank in die if isinstance(die, tuple) else die) and \
                    groups.role(rank) == "leaves":
                faults = Faults()
                faults.actions["handoff"] = lambda *_: os._exit(17)
                inject_faults(rt, faults)
            for step in range(1, 13):  # serve a little: a window and a rebalance-free history
                for model in models.values():
                    _feed(model, step)
                await rt.step()
            before = rt.history(names[0])
            start = time.monotonic()
            try:
                report = await rt.reconfigure(groups, rank_mapping=groups.rank_mapping)
                result["report"] = report
            except ExpertsLost as exc:
                result["lost"] = {k: dict(v) for k, v in exc.lost.items()}
                result["report"] = exc.report
            except RebalanceFailed as exc:
                result["error"] = str(exc)
            result["seconds"] = time.monotonic() - start
            result["history_before"] = [tuple(r) for r in before]
            if groups.role(rank) == "leaves":
                with pytest.raises(RuntimeError, match="left the deployment"):
                    await rt.step()
                result["phase"] = rt.phase()
                return result
        else:
            new_rank = new.index(rank)
            models = {name: TaggedMoEModel(new_rank, len(new), L, E, len(new) * LOCAL - E)
                      for name in names}
            for model in models.values():
                for tensors in model.expert_weights:  # poison: weights come from the transfer
                    for tensor in tensors:
                        tensor.fill_(-7)
            rt = await EplbRuntime.join(_config(len(old)), groups, models)
            result["report"] = rt.last_reconfiguration
        states = {name: _state(rt, model, name) for name, model in models.items()}
        for step in range(3):  # serving goes on in the new rank set
            for model in models.values():
                _feed(model, step)
            await rt.step()
        for name, model in models.items():
            states[name]["after"] = _state(rt, model, name)
        rt.close()
        if initial is None:
            result.update(states["main"])
        else:
            result["models"] = states
        return result

    torch.manual_seed(rank)
    return asyncio.run(main())


def _retag(model: TaggedMoEModel, placement: Any) -> None:
    """Fill `model`'s slots for a non-default `placement`."""
    n = model.num_local_physical_experts
    for layer, tensors in enumerate(model.expert_weights):
        for slot in range(n):
            expert = int(placement.physical_to_logical[layer, model.rank * n + slot])
            for i, tensor in enumerate(tensors):
                tensor[slot] = model.tag(layer, expert, i)


def _remaining(results: list[dict[str, Any]], new: list[int]) -> list[dict[str, Any]]:
    kept = [results[r] for r in new]
    for r in kept:
        assert r["wrong_slots"] == [], r["wrong_slots"]
        assert r["maps_agree"] and r["min_replicas"] >= 1
        assert r["after"]["wrong_slots"] == [] and r["after"]["phase"] == "collecting"
        assert len(r["placement"][0]) == len(new) * LOCAL
    assert all(r["history"] == kept[0]["history"] for r in kept)
    assert all(r["placement"] == kept[0]["placement"] for r in kept)
    assert all(r["step"] == 12 for r in kept)
    return kept


@pytest.mark.parametrize(("world", "old", "new"), [
    (4, [0, 1, 2, 3], [0, 1]),
    (4, [0, 1, 2, 3], [0, 1, 3]),
    (4, [0, 1], [0, 1, 2, 3]),
], ids=["4to2", "4to3_middle_leaves", "2to4"])
def test_scale_keeps_every_slot_true_and_histories_equal(world: int, old: list[int],
                                                         new: list[int]) -> None:
    results = run_ranks(_rank_main, world, old, new, None, False, timeout=90)
    kept = _remaining(results, new)
    tail = [(s, a, b, t) for s, a, b, t in kept[0]["history"] if s == 12]
    assert [(a, b) for _, a, b, _ in tail] == [
        ("collecting", "reconfiguring"), ("reconfiguring", "resizing"),
        ("resizing", "collecting")]
    for r in kept:
        assert r["report"].num_new_ranks == len(new) and not r["report"].salvaged
        assert r["report"].rank_mapping == tuple(new.index(g) if g in new else -1 for g in old)
    for rank in set(old) - set(new):
        assert results[rank]["phase"] == "released"
        assert results[rank]["history_before"] == kept[0]["history"][:-3]
    if set(new) - set(old):  # joining ranks received every slot over the network
        assert all(results[r]["report"].bytes_received > 0 for r in set(new) - set(old))


# 4 -> 3, old rank 2 leaves and dies at its first handoff. Slots 6..8 are rank 2's.
ONLY_ON_2 = [0, 1, 2, 3, 0, 1, 4, 5, 2, 3, 0, 1]  # experts 4 and 5 live only on rank 2
REPLICATED = [0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2, 3]  # rank 2's experts are also on 1 and 3


def test_leaving_rank_that_dies_before_handoff() -> None:
    # Two models in one spawn: "sole" loses experts 4 and 5, "replicated" loses nothing.
    initial = {"sole": ONLY_ON_2, "replicated": REPLICATED}
    lost_by_model = {"sole": [4, 5], "replicated": []}
    start = time.monotonic()
    results = run_ranks(_rank_main, 4, [0, 1, 2, 3], [0, 1, 3], initial, True, timeout=90,
                        may_die=(2,))
    assert results[2] is None, "rank 2 was to die"
    assert time.monotonic() - start < 60
    kept = [results[r] for r in (0, 1, 3)]
    for r in kept:
        assert r["seconds"] < 6 * TIMEOUT_S + 5, "survivors took too long"
        report = r["report"]
        assert report.salvaged and report.unavailable_ranks == (2,)
        # Only the model with sole copies lost experts (ExpertsLost names it alone).
        assert r["lost"] == {"sole": {0: (4, 5), 1: (4, 5)}}
        assert set(report.lost) == {"sole"} and set(report.reload_slots) == {"sole"}
        for name, lost in lost_by_model.items():
            state = r["models"][name]
            assert state["maps_agree"] and state["min_replicas"] >= 1, name
            if lost:
                p2l = np.asarray(state["placement"])
                reload = report.reload_slots[name]
                for layer in range(L):
                    assert set(p2l[layer, list(reload[layer])].tolist()) == set(lost)
                # Every slot but the lost experts' holds the right weights.
                n = LOCAL
                rank = kept.index(r)
                allowed = {(layer, s - rank * n) for layer in range(L) for s in reload[layer]
                           if rank * n <= s < (rank + 1) * n}
                assert set(state["wrong_slots"]) <= allowed
                assert state["phase"] == "failed" and state["after"]["phase"] == "collecting"
            else:
                assert state["wrong_slots"] == [] and state["after"]["wrong_slots"] == [], name
                assert state["phase"] == "collecting", name
    for name in initial:
        history = kept[0]["models"][name]["history"]
        assert all(r["models"][name]["history"] == history for r in kept), name
        states = [(a, b) for s, a, b, _ in history if s == 12]
        assert ("reconfiguring", "salvaging") in states and ("salvaging", "resizing") in states


def _refused_or_failed(rank: int, world: int, case: str) -> dict[str, Any]:
    """Every old rank asks for a reconfiguration that cannot work; afterwards it must
    serve on, in a state the lifecycle allows, and balance again."""
    old = list(range(world))
    new = [0] if case == "too_few_ranks" else old

    async def main() -> dict[str, Any]:
        group = dist.new_group(old, backend="gloo")
        cpu = dist.new_group(old, backend="gloo")
        groups = ElasticGroups.create(old, new)
        rt = EplbRuntime(_config(world), group=group, cpu_group=cpu)
        model = TaggedMoEModel(rank, world, L, E, world * LOCAL - E)
        rt.add_model(model, "main")
        out: dict[str, Any] = {}
        for step in range(1, 6):
            _feed(model, step)
            await rt.step()
        try:
            await rt.reconfigure(groups)
            out["error"] = None
        except (ValueError, RebalanceFailed) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["phase_after_error"] = rt.phase()
        for step in range(6, 9):
            _feed(model, step)
            await rt.step()  # no MachineError: the lifecycle is where the table allows
        out["phase"] = rt.phase()
        await rt.rearrange_async()  # balancing still works on the old rank set
        out["history"] = [tuple(r) for r in rt.history()]
        out["wrong_slots"] = model.wrong_slots(rt.placement().physical_to_logical)
        rt.close()
        return out

    return asyncio.run(main())


def test_a_rank_set_too_small_is_refused_before_anything_changes() -> None:
    results = run_ranks(_refused_or_failed, 4, "too_few_ranks", timeout=90)
    for r in results:
        assert r["error"] and r["error"].startswith("ValueError"), r
        assert "1 new rank(s) x 3 slots per rank = 3 slots cannot hold" in r["error"]
        assert r["phase_after_error"] == "collecting" and r["phase"] == "collecting"
        assert r["wrong_slots"] == []
        assert r["history"] == results[0]["history"]


def _joiner_case(rank: int, world: int, case: str) -> dict[str, Any]:
    """Old ranks [0, 1, 2] replace rank 2 by joining rank 3; `case` says what is
    wrong with the joiner (or how slow it is)."""
    old, new = [0, 1, 2], [0, 1, 3]

    async def main() -> dict[str, Any]:
        old_group = dist.new_group(old, backend="gloo")
        old_cpu = dist.new_group(old, backend="gloo")
        groups = ElasticGroups.create(old, new)
        out: dict[str, Any] = {"role": groups.role(rank)}
        cfg = _config(len(old))
        if rank in old:
            rt = EplbRuntime(cfg, group=old_group, cpu_group=old_cpu)
            model = TaggedMoEModel(rank, len(old), L, E, len(old) * LOCAL - E)
            rt.add_model(model, "main")
            for step in range(1, 13):
                _feed(model, step)
                await rt.step()
            if case == "after_failed_rebalance":
                faults = Faults()
                if rank == 1:
                    faults.fail_at["stage"] = RuntimeError("simulated OOM while staging")
                inject_faults(rt, faults)
                try:
                    await rt.rearrange_async()
                except RebalanceFailed as exc:
                    out["first_error"] = str(exc)
                inject_faults(rt, None)
                out["before"] = (rt.phase(), rt.busy)
            start = time.monotonic()
            try:
                out["report"] = await rt.reconfigure(groups)
                out["error"] = None
            except (ValueError, RebalanceFailed) as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            out["seconds"] = time.monotonic() - start
            if out["error"] is None and groups.role(rank) == "leaves":
                return out
            out["phase_after"] = rt.phase()
            for step in range(13, 16):
                _feed(model, step)
                await rt.step()  # serving goes on, in the old set or the new one
            out.update(_state(rt, model))
            rt.close()
            return out
        local = LOCAL + 1 if case == "one_slot_too_many" else LOCAL
        model = TaggedMoEModel(new.index(rank), len(new), L, E, len(new) * local - E)
        if case == "other_dtype":
            model.expert_weights[1][0] = model.expert_weights[1][0].to(torch.float64)
        if case == "slow":
            time.sleep(2 * TIMEOUT_S)  # building the model takes twice the timeout
        if case == "joiner_dies":
            def die(*args: Any, **kwargs: Any) -> Any:
                os._exit(17)  # before it received any weight

            monkeypatched = pytest.MonkeyPatch()
            monkeypatched.setattr(TransferEngine, "stage", die)
        for tensors in model.expert_weights:  # weights come from the transfer
            for tensor in tensors:
                tensor.fill_(-7)
        try:
            rt = await EplbRuntime.join(cfg, groups, {"main": model})
        except (ValueError, RebalanceFailed) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out
        out["error"] = None
        out["report"] = rt.last_reconfiguration
        for step in range(13, 16):
            _feed(model, step)
            await rt.step()
        out.update(_state(rt, model))
        rt.close()
        return out

    torch.manual_seed(rank)
    return asyncio.run(main())


@pytest.mark.parametrize("case", ["other_dtype", "one_slot_too_many"])
def test_a_joiner_that_disagrees_is_refused_on_every_rank_before_a_byte_moves(
        case: str) -> None:
    results = run_ranks(_joiner_case, 4, case, timeout=90)
    joiner = results[3]
    # The lifecycle's end: failed, with RebalanceFailed carrying the ValueError.
    assert joiner["error"] and joiner["error"].startswith("RebalanceFailed"), joiner
    assert "ValueError" in joiner["error"]
    what = "expert_weights[1][0] is torch.float64" if case == "other_dtype" else "slots per rank"
    assert what in joiner["error"], joiner["error"]
    for r in results[:3]:
        assert r["error"] and r["error"].startswith("RebalanceFailed"), r["error"]
        assert "joining global rank 3 refused the reconfiguration" in r["error"]
        assert "nothing was moved" in r["error"]
        # Every old rank, the leaving one too, serves on in the old set, unchanged.
        assert r["phase_after"] == "failed" and r["phase"] == "collecting"
        assert r["wrong_slots"] == [] and r["maps_agree"]
        assert len(r["placement"][0]) == 3 * LOCAL
    assert results[0]["history"] == results[1]["history"] == results[2]["history"]


def test_a_slow_joiner_delays_the_handover_instead_of_making_live_ranks_give_up() -> None:
    results = run_ranks(_joiner_case, 4, "slow", timeout=90)
    for rank in (0, 1, 3):
        r = results[rank]
        assert r["error"] is None, r["error"]
        assert not r["report"].salvaged and not r["report"].lost, r["report"]
        assert r["wrong_slots"] == [] and r["maps_agree"]
    assert results[2]["error"] is None and results[2]["report"].role == "leaves"
    assert results[0]["seconds"] > 2 * TIMEOUT_S - 1  # it waited for the joiner
    assert results[0]["history"] == results[1]["history"] == results[3]["history"]


def test_reconfigure_is_accepted_right_after_a_failed_rebalance() -> None:
    results = run_ranks(_joiner_case, 4, "after_failed_rebalance", timeout=90)
    for rank in (0, 1, 2):
        assert "rank(s) [1] reported an error" in results[rank]["first_error"]
        assert results[rank]["before"] == ("failed", False)  # not busy, so accepted
    for rank in (0, 1, 3):
        r = results[rank]
        assert r["error"] is None, r["error"]
        assert r["wrong_slots"] == [] and r["maps_agree"] and r["phase"] == "collecting"
    assert results[0]["history"] == results[1]["history"] == results[3]["history"]


def test_a_joiner_that_dies_before_its_weights_leaves_old_ranks_serving() -> None:
    results = run_ranks(_joiner_case, 4, "joiner_dies", timeout=120, may_die=(3,))
    assert results[3] is None, "the joiner was to die"
    for r in results[:3]:
        # A RebalanceFailed naming the cause, never a raw collective error; the old
        # rank set serves on with its weights and maps unchanged.
        assert r["error"] and r["error"].startswith("RebalanceFailed"), r["error"]
        assert r["phase_after"] == "failed" and r["phase"] == "collecting"
        assert r["wrong_slots"] == [] and r["maps_agree"]
        assert len(r["placement"][0]) == 3 * LOCAL
    assert results[0]["history"] == results[1]["history"] == results[2]["history"]


# 4 -> 2: ranks 2 and 3 leave, rank 2 dies at its first handoff. Experts 4 and 5 live
# only on the leaving ranks: their last live copies are on rank 3.
ONLY_ON_LEAVERS = [0, 1, 2, 3, 0, 1, 4, 5, 2, 4, 5, 3]


def test_salvage_takes_copies_from_a_live_leaving_rank() -> None:
    results = run_ranks(_rank_main, 4, [0, 1, 2, 3], [0, 1], {"main": ONLY_ON_LEAVERS}, (2,),
                        timeout=120, may_die=(2,))
    assert results[2] is None, "rank 2 was to die"
    assert results[3]["phase"] == "released", results[3]  # it handed its copies off
    for r in (results[0], results[1]):
        report = r["report"]
        assert report.salvaged and report.unavailable_ranks == (2,), report
        assert "lost" not in r and report.lost == {}, report  # nothing lost: rank 3 sent
        state = r["models"]["main"]
        assert state["wrong_slots"] == [] and state["maps_agree"], state
        assert state["after"]["wrong_slots"] == [] and state["phase"] == "collecting"
    assert results[0]["models"]["main"]["history"] == results[1]["models"]["main"]["history"]


# 3 -> 3, rank 2 replaced by rank 3 and dying at its first handoff; experts 4 and 5
# live only on rank 2.
ONLY_ON_THE_REPLACED = [0, 1, 2, 3, 0, 1, 4, 5, 2]


def test_a_joiner_gets_its_runtime_when_the_replaced_rank_dies() -> None:
    results = run_ranks(_rank_main, 4, [0, 1, 2], [0, 1, 3], {"main": ONLY_ON_THE_REPLACED},
                        (2,), timeout=120, may_die=(2,))
    assert results[2] is None, "rank 2 was to die"
    joiner = results[3]
    # No ExpertsLost raised from join: the runtime came back with the loss reported.
    assert joiner["report"].lost == {"main": {0: (4, 5), 1: (4, 5)}}, joiner["report"]
    assert joiner["report"].unavailable_ranks == (2,)
    for r in (results[0], results[1]):
        assert r["lost"] == {"main": {0: (4, 5), 1: (4, 5)}}  # ExpertsLost on old ranks
    states = [r["models"]["main"] for r in (results[0], results[1], joiner)]
    assert all(s["history"] == states[0]["history"] for s in states)
    assert all(s["after"]["phase"] == "collecting" for s in states)  # serving went on

"""Bad configuration and mismatched models are refused before anything changes."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import FakeCluster, TaggedMoEModel


@pytest.mark.parametrize(("field", "value", "match"), [
    ("window_size", 0, "window_size must be a positive int"),
    ("step_interval", 2.5, "step_interval must be a positive int"),
    ("num_redundant_experts", -1, "num_redundant_experts must be an int >= 0"),
    ("use_async", "yes", "use_async must be a bool"),
    ("readiness_lag", True, "readiness_lag must be a positive int"),
    ("peer_timeout_s", 0, "peer_timeout_s must be > 0"),
    ("on_failure", "ignore", "on_failure must be 'raise' or 'absorb'"),
    ("min_balancedness_gain", 2.0, r"min_balancedness_gain must be a number in \[-1, 1\]"),
    ("num_groups", 0, "num_groups must be a positive int or None"),
    ("policy_options", [1], "policy_options must be a mapping or None"),
    # Values nothing could allocate or count with: refused here, not at add_model
    # (window_size=2**40 was an allocator RuntimeError there, 2**64 a TypeError).
    ("window_size", 2**40, r"EplbConfig\.window_size=1099511627776 is too large: the limit "
                           r"is 16777216 \(the load window's ring must be allocatable\)"),
    ("window_size", 2**64, r"window_size=18446744073709551616 is too large"),
    ("load_record_interval", 2**24 + 1, r"load_record_interval=16777217 is too large"),
    ("step_interval", 2**63, r"step_interval=9223372036854775808 is too large: the limit is "
                             r"4611686018427387904 \(step numbers are int64\)"),
    ("log_balancedness_interval", 2**62 + 1, r"log_balancedness_interval=\d+ is too large"),
    ("readiness_lag", 2**31, r"readiness_lag=2147483648 is too large: the limit is 2147483647"),
    ("num_redundant_experts", 2**31, r"num_redundant_experts=2147483648 is too large: the "
                                     r"limit is 2147483647 \(physical slot ids"),
    ("num_nodes", 2**31, r"num_nodes=2147483648 is too large"),
    ("num_groups", 2**40, r"num_groups=1099511627776 is too large"),
    ("ranks_per_node", 2**31, r"ranks_per_node=2147483648 is too large"),
    ("layers_per_transfer", 2**31, r"layers_per_transfer=2147483648 is too large"),
])
def test_config_fields_are_checked(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EplbConfig(**{field: value})  # type: ignore[arg-type]


def test_every_int_field_has_a_limit_and_the_limit_itself_is_accepted() -> None:
    from eplb_fsm._runtime.config import LIMITS

    ints = {f.name for f in fields(EplbConfig) if "int" in str(f.type)}
    assert ints == set(LIMITS)
    for name, (limit, _) in LIMITS.items():
        assert getattr(EplbConfig(**{name: limit}), name) == limit  # type: ignore[arg-type]


def test_unknown_policy_and_options_are_refused_at_runtime_creation() -> None:
    with pytest.raises(ValueError, match=r"policy 'nope' is unknown; known policies: default"):
        FakeCluster(2, EplbConfig(policy="nope"))
    with pytest.raises(ValueError, match=r"EplbConfig\.policy_options"):
        FakeCluster(2, EplbConfig(policy="default", policy_options={"tolerance": 0.1}))
    FakeCluster(2, EplbConfig(policy="incremental", policy_options={"tolerance": 0.01}))


def test_runtime_needs_torch_distributed() -> None:
    with pytest.raises(ValueError, match=r"needs torch\.distributed initialised"):
        EplbRuntime(EplbConfig())


class _Broken(TaggedMoEModel):
    pass


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda m: setattr(m, "num_redundant_experts", 2),
     "num_physical_experts=16 must equal num_logical_experts"),
    (lambda m: setattr(m, "num_local_physical_experts", 3),
     "num_local_physical_experts=3 x 2 ranks"),
    (lambda m: m.expert_weights.pop(), "expert_weights has 1 layers"),
    (lambda m: m.expert_weights[0].__setitem__(0, torch.zeros(5, 4)),
     r"expert_weights\[0\]\[0\] must be a tensor whose first dim"),
    (lambda m: setattr(m, "num_moe_layers", "2"), "num_moe_layers must be an int"),
    (lambda m: delattr(m, "expert_weights"), "model lacks 'expert_weights'"),
])
def test_models_that_disagree_with_the_config_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    cluster = FakeCluster(2, EplbConfig(num_redundant_experts=4))
    model = _Broken(0, 2, 2, 12, 4)
    mutate(model)
    with pytest.raises(ValueError, match=match):
        cluster.runtimes[0].add_model(model, "main")
    assert cluster.runtimes[0].models == ()


def test_redundant_count_must_match_the_config() -> None:
    cluster = FakeCluster(2, EplbConfig(num_redundant_experts=2))
    with pytest.raises(ValueError, match=r"EplbConfig\.num_redundant_experts=2 disagrees"):
        cluster.runtimes[0].add_model(TaggedMoEModel(0, 2, 2, 12, 4), "main")


def test_duplicate_names_are_refused() -> None:
    cluster = FakeCluster(2, EplbConfig(num_redundant_experts=4))
    cluster.add_model("main", num_layers=2, num_logical=12)
    with pytest.raises(ValueError, match="already added"):
        cluster.runtimes[0].add_model(TaggedMoEModel(0, 2, 2, 12, 4), "main")

"""docs/integration.md stays true: its code runs, its table matches EplbConfig, its
metric names and file references exist.

Convention (stated at the top of the page): every ```python block runs, top to bottom in
one namespace, unless its first line is ``# fragment: ...``; fragments need an engine or a
process group and are only compiled.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from eplb_fsm import EplbConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integration.md"
FRAGMENT = "# fragment:"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    text = DOC.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def test_every_block_compiles_and_is_runnable_or_marked() -> None:
    blocks = python_blocks()
    runnable = [code for _, code in blocks if not code.startswith(FRAGMENT)]
    assert len(runnable) >= 5 and len(blocks) > len(runnable)
    for line, code in blocks:
        # Fragments may await at top level (they sit in an engine's coroutine);
        # runnable blocks must be plain modules.
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if code.startswith(FRAGMENT) else 0
        compile(code, f"{DOC}:{line}", "exec", flags=flags)


def test_runnable_blocks_run_in_order() -> None:
    pytest.importorskip("prometheus_client")  # section 6 uses the metrics extra
    namespace: dict[str, object] = {"__name__": "integration_doc"}
    for line, code in python_blocks():
        if code.startswith(FRAGMENT):
            continue
        # Line numbers in tracebacks point into the page.
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    assert "ToyMoE" in namespace and "BlockingStepper" in namespace


def test_blocking_stepper_drives_a_runtime_from_sync_code() -> None:
    namespace: dict[str, object] = {}
    stepper_block = next(code for _, code in python_blocks() if "class BlockingStepper" in code)
    exec("import eplb_fsm\n" + stepper_block, namespace)
    from eplb_fsm.testing import FakeCluster

    cluster = FakeCluster(1, EplbConfig(window_size=5, step_interval=10,
                                        num_redundant_experts=2))
    cluster.add_model("main", num_layers=2, num_logical=6)
    stepper = namespace["BlockingStepper"](cluster.runtimes[0])  # type: ignore[operator]
    for _ in range(30):
        cluster.feed("main", 0, [[6, 5, 4, 3, 2, 1]] * 2)
        stepper.step()
    assert cluster.runtimes[0].step_count == 30
    assert [r.step for r in cluster.runtimes[0].history()][:1] == [10]
    stepper.close()


def test_config_table_matches_eplb_config() -> None:
    defaults = EplbConfig()
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| (`[^|]+`) \|", DOC.read_text(), flags=re.M)
    checked = set()
    for names, values in rows:
        for name, value in zip(re.findall(r"`(\w+)`", names), re.findall(r"`([^`]+)`", values),
                               strict=True):
            assert repr(getattr(defaults, name)) == value, name
            checked.add(name)
    assert {"window_size", "step_interval", "peer_timeout_s", "on_failure"} <= checked


def test_referenced_files_and_metric_names_exist() -> None:
    text = DOC.read_text()
    for path in set(re.findall(r"`((?:examples|docs|tests/edges|eplb_fsm)/[\w/]+\.(?:py|md))",
                               text)):
        assert (ROOT / path).exists(), path
    prometheus = pytest.importorskip("prometheus_client")
    from eplb_fsm.metrics import EplbMetrics
    from eplb_fsm.testing import FakeCluster

    cluster = FakeCluster(2, EplbConfig(num_redundant_experts=2))
    cluster.add_model("main", num_layers=1, num_logical=4)
    registry = prometheus.CollectorRegistry()
    EplbMetrics(cluster.runtimes[0], registry)
    # Family names: present even before a first plan or a first observation.
    families = list(registry.collect())
    exported = {f.name for f in families} | {f.name + "_total" for f in families
                                             if f.type == "counter"}
    mentioned = set(re.findall(r"\b(eplb_[a-z_]+)(?=[`{])", text)) - {"eplb_fsm"}
    mentioned -= {"eplb_map_to_physical_and_record"}  # vLLM's function, named for comparison
    assert mentioned and mentioned <= exported, mentioned - exported

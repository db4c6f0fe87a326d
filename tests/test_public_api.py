"""The public facade: every name in `eplb_fsm.__all__` resolves, lazily, to the
object its private module defines, and importing the package costs no torch."""

from __future__ import annotations

import subprocess
import sys

import eplb_fsm


def test_every_public_name_resolves_to_its_module_object() -> None:
    where = {name: module for module, names in eplb_fsm._WHERE.items() for name in names}
    assert set(where) | {"__version__"} == set(eplb_fsm.__all__)
    for name, module in where.items():
        private = __import__(f"eplb_fsm{module}", fromlist=[name])
        assert getattr(eplb_fsm, name) is getattr(private, name), name
    assert set(eplb_fsm.__all__) <= set(dir(eplb_fsm))


def test_importing_the_package_imports_no_torch_and_names_load_on_use() -> None:
    # The command line relies on it to answer Ctrl-C while it starts.
    code = ("import sys, eplb_fsm\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
            "eplb_fsm.EplbRuntime\n"
            "assert 'torch' in sys.modules\n"
            "try:\n"
            "    eplb_fsm.no_such_name\n"
            "except AttributeError as exc:\n"
            "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'eplb_fsm' has no attribute 'no_such_name'"

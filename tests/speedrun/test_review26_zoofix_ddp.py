"""Review 26 (zoofix): tests/examples/test_zoo_ddp.py spawned its 2 gloo ranks with ``mp.spawn`` on a bare
``free_port()``: another process taking that port before rank 0 bound it failed the test ("address already in
use"), and a hung rank had no deadline. It runs them by ``support.ranks.run_ranks`` now, which launches again on a
new port; here the first port handed out is one this test listens on."""
import importlib

import pytest

from reliability.test_review24_flake import _first_port_taken


@pytest.mark.slow  # the 2-rank float64 trainer comparison (~30 s on the 2-core machine)
@pytest.mark.distributed
def test_zoo_ddp_relaunches_when_its_master_port_is_taken(tmp_path, monkeypatch):
    zoo_ddp = importlib.import_module("tests.examples.test_zoo_ddp")  # "examples" is the repository's package
    with _first_port_taken(monkeypatch) as (port, given):
        if hasattr(zoo_ddp, "free_port"):  # the module's own name for it (mp.spawn's launch used that)
            monkeypatch.setattr(zoo_ddp, "free_port", lambda: given.append(port) or port)
        zoo_ddp.test_two_gloo_ranks_match_single_process(tmp_path)
    assert len(given) == 2 and given[0] == port

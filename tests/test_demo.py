"""The quick demo (PICO_DEMO_QUICK): the paper's Figure 8 on a real switch, three modes."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, OVS and "
                                 "Faucet; CI runs as root")]


@pytest.mark.timeout(420)
def test_quick_demo_no_ha_breaks_whole_box_and_pico_keep_and_pico_is_faster(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sdn.demo", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "summary" in proc.stdout and "whole-box" in proc.stdout     # progress and summary
    figs = json.loads((out / "fig8.json").read_text())
    modes = {m["mode"]: m for m in figs["modes"]}
    assert modes["no-ha"]["broken"] == modes["no-ha"]["connections"] == 10
    assert modes["whole-box"]["broken"] == 0 and modes["pico"]["broken"] == 0
    assert modes["pico"]["latency_before_ms"] < modes["whole-box"]["latency_before_ms"]
    png = (out / "fig8.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

"""The trainer-side hook (sd-scripts/fluxgymd_hook/sitecustomize.py) in a real child Python."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HOOK = Path(__file__).resolve().parent.parent / "sd-scripts" / "fluxgymd_hook"

CHILD = r"""
import json, sys, time
import torch.utils.data as tud
ds = list(range(4))
with_workers = tud.DataLoader(ds, num_workers=1)
without = tud.DataLoader(ds, num_workers=0)
explicit = tud.DataLoader(ds, num_workers=1, timeout=5)
print(json.dumps([with_workers.timeout, without.timeout, explicit.timeout]), flush=True)
def fluxgymd_test_waiting_here():
    time.sleep(60)
fluxgymd_test_waiting_here()
"""


def hook_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(HOOK), FLUXGYMD_STACKS_DIR=str(tmp / "stacks"), **extra)
    return env


def test_hook_sets_dataloader_timeout_and_dumps_stacks_on_sigusr1(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", CHILD], env=hook_env(tmp_path, FLUXGYMD_DATALOADER_TIMEOUT_S="123"),
                         stdout=subprocess.PIPE, text=True)
    try:
        timeouts = json.loads(p.stdout.readline())
        # workers get the finite timeout; no workers (timeout must stay 0) and explicit ones are left alone
        assert timeouts == [123, 0, 5]
        stacks = tmp_path / "stacks" / f"stacks-{p.pid}.txt"
        assert stacks.exists()  # opened at start-up, before anything can hang
        size = stacks.stat().st_size
        p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "fluxgymd_test_waiting_here" not in stacks.read_text():
            time.sleep(0.05)
        assert stacks.stat().st_size > size and "fluxgymd_test_waiting_here" in stacks.read_text()
        assert p.poll() is None  # a dump does not stop the trainer
    finally:
        p.kill()
        p.wait()


def test_hook_chains_to_a_site_sitecustomize(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import builtins\nbuiltins.SITE_HOOK_RAN = True\n")
    env = hook_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK), str(site)])
    out = subprocess.run([sys.executable, "-c", "import builtins; print(getattr(builtins, 'SITE_HOOK_RAN', False))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"

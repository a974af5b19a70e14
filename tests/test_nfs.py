"""The two-VM NFS race: `.ci/nfs/run twonode` (two qemu VMs, two real NFS
clients of one kernel nfsd, 2 processes per node racing global_mutex on
NFSv3 and NFSv4.2). Slow (a few minutes under software emulation) and needs
root and qemu (the rig installs qemu where apt-get can), so `-m slow` only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

RIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "nfs", "run")
SKIPPED = 77  # the rig's exit status when this machine cannot run it


def why_not_here() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the NFS rig needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "the NFS rig needs root"
    if shutil.which("qemu-system-x86_64") is None and shutil.which("apt-get") is None:
        return "the NFS rig needs qemu-system-x86_64 (or apt-get to install it)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_global_mutex_across_two_nfs_clients() -> None:
    why = why_not_here()
    if why:
        pytest.skip(why)
    rig = subprocess.run(
        ["bash", RIG, "twonode"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1750,
    )
    lines = rig.stdout.splitlines()
    if rig.returncode == SKIPPED:
        pytest.skip(lines[-1] if lines else "the NFS rig cannot run here")
    assert rig.returncode == 0, "\n".join(lines[-40:])

"""ci/install-system.sh, which `make demo`, `make test` and `.ci/run` call first: silent when everything is
installed, and, for a user who is neither root nor allowed `sudo -n`, one line with the command to run as root.

Run through real subprocesses and the real dpkg database; the packages it is asked about are either one every
Debian system has (dpkg) or one that cannot exist, so nothing is ever installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.stack.manager import INSTALL_HINTS

SCRIPT = Path(__file__).resolve().parents[1] / "ci" / "install-system.sh"
NO_SUCH_PACKAGE = "voxelflow-no-such-package"


def as_unprivileged_user(*packages: str) -> subprocess.CompletedProcess[str]:
    """The script as a user who can neither write the dpkg database nor sudo without a password."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root")
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(SCRIPT), *packages]
    else:
        sudo_works = (
            shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
        )
        if sudo_works:
            pytest.skip("this user may sudo without a password: the script would try to install")
        argv = [str(SCRIPT), *packages]
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_everything_installed_is_silent_and_succeeds() -> None:
    result = subprocess.run([str(SCRIPT), "dpkg"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_without_root_or_sudo_one_line_names_the_command() -> None:
    result = as_unprivileged_user("dpkg", NO_SUCH_PACKAGE)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"voxelflow: missing Debian packages {NO_SUCH_PACKAGE}; run as root: "
        f"apt-get update && apt-get install -y --no-install-recommends {NO_SUCH_PACKAGE}"
    ]


def test_every_package_the_stack_names_is_in_the_script() -> None:
    """The stack's "not installed" messages send users to `make install-system`: it must install those packages."""
    named = set()
    for hint in INSTALL_HINTS.values():
        for first, second in re.findall(r"Debian packages? ([a-z0-9.+-]+)(?: and ([a-z0-9.+-]+))?", hint):
            named |= {first, second} - {""}
    listed = SCRIPT.read_text().split("\nPACKAGES=(", 1)[1].split(")", 1)[0].split()
    assert {"postgresql", "redis-server", "orthanc", "orthanc-dicomweb"} <= named
    assert named <= set(listed)

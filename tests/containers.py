"""Real containers for the container backend's tests: podman, an image made
here, and a real registry on 127.0.0.1 serving it at nixery's names.

No registry outside is reachable, so the image is a root file system built
from this host's own programs (bash, coreutils and the libraries they load)
and imported with ``podman import``; Debian's ``docker-registry`` (the CNCF
distribution registry) serves it over plain HTTP, pushed under the names the
official spindle asks nixery for (``<packages…>/bash/git/coreutils/nix``).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path

# Programs the test image carries: what the tests' steps run.
PROGRAMS = (
    "bash", "sh", "cat", "ls", "mkdir", "chmod", "head", "tail", "sleep", "env", "id",
    "rm", "seq", "wc", "grep", "tr", "dd", "true", "false", "printf", "echo", "test", "base64",
)  # fmt: skip


def problem() -> str | None:
    """Why container tests cannot run here, or None."""
    for tool in ("podman", "docker-registry"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; .ci/run installs podman, runc and docker-registry"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    return None


def _libraries(program: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    return [Path(word) for word in out.split() if word.startswith("/")]


def build_root(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    for folder in ("etc", "tmp", "root"):
        (root / folder).mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for name in PROGRAMS:
        found = shutil.which(name)
        if found is None:
            continue
        program = Path(found).resolve()
        shutil.copy2(program, root / "usr/bin" / name)
        for library in _libraries(program):
            target = root / str(library).lstrip("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(library.resolve(), target)


def import_image(work: Path) -> str:
    """The test image, imported into podman's local store; its name."""
    root = work / "root"
    build_root(root)
    archive = work / "root.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    name = f"localhost/tack-test/base:{digest}"
    subprocess.run(["podman", "import", "--quiet", str(archive), name], check=True, timeout=120)
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """Debian's docker-registry on 127.0.0.1, storing under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        config = folder / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self._proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "registry.log").open("wb"),
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, image: str, path: str) -> str:
        """Push ``image`` as ``<registry>/<path>`` and drop the local copy of
        that name, so whoever wants it must pull it; the pushed name."""
        name = f"{self.address}/{path}"
        run = ["podman", "push", "--quiet", "--tls-verify=false", image, f"docker://{name}"]
        subprocess.run(run, check=True, timeout=120, capture_output=True)
        forget(name)
        return name

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


def forget(image: str) -> None:
    subprocess.run(["podman", "rmi", "--force", image], capture_output=True, timeout=60)


def containers_labelled(label: str) -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return out.split()


def networks_named(prefix: str) -> list[str]:
    out = subprocess.run(
        ["podman", "network", "ls", "--format", "{{.Name}}"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return [name for name in out.split() if name.startswith(prefix)]

"""Unit tests never touch the real cache or run dir."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from czone import artifacts


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("CZONE_QEMU", "CZONE_KERNEL", "CZONE_ACCEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CZONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CZONE_RUN", str(tmp_path / "run"))
    return tmp_path


@pytest.fixture
def fake_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Files where the cache expects kernel, image and QEMU (none of them runnable)."""
    k, i = artifacts.artifact_dir("kernel"), artifacts.artifact_dir("image")
    k.mkdir(parents=True)
    i.mkdir(parents=True)
    (k / "vmlinux").write_bytes(b"\x7fELF")
    (k / "release").write_text("6.12.0-czone\n")
    (i / "rootfs.squashfs").write_bytes(b"hsqs")
    (i / "fnbase.squashfs").write_bytes(b"hsqs")
    (i / "id_ed25519").write_text("not a key\n")
    (i / "version").write_text("test-1\n")
    qemu = tmp_path / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    qemu.write_text("#!/bin/sh\nexit 1\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("CZONE_QEMU", str(qemu))
    return {"vmlinux": k / "vmlinux", "rootfs": i / "rootfs.squashfs", "qemu": qemu,
            "key": i / "id_ed25519"}


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    # paramiko can read but not generate ed25519 keys.
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen not installed")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path

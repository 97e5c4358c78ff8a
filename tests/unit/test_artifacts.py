from pathlib import Path

import pytest

from czone import artifacts


def _tree(root: Path) -> Path:
    for rel in ("kernel-patches/6.12.x/0001-a.patch", "kernel-patches/configs/c.config",
                "scripts/build-kernel.sh", "scripts/lib.sh"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_key_is_stable_and_follows_inputs(tmp_path):
    root = _tree(tmp_path)
    k1 = artifacts.input_key("kernel", root)
    assert k1 == artifacts.input_key("kernel", root)
    (root / "kernel-patches/configs/c.config").write_text("CONFIG_X=y\n")
    k2 = artifacts.input_key("kernel", root)
    assert k2 != k1
    (root / "kernel-patches/6.12.x/0002-b.patch").write_text("new")
    assert artifacts.input_key("kernel", root) not in (k1, k2)


def test_key_ignores_other_artifacts_inputs(tmp_path):
    root = _tree(tmp_path)
    k = artifacts.input_key("kernel", root)
    (root / "guest-image").mkdir()
    (root / "guest-image/packages").write_text("python3\n")
    assert artifacts.input_key("kernel", root) == k


def test_missing_artifact_names_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("CZONE_CACHE", str(tmp_path))
    monkeypatch.delenv("CZONE_KERNEL", raising=False)
    with pytest.raises(artifacts.ArtifactMissing, match="make kernel"):
        artifacts.kernel()
    with pytest.raises(artifacts.ArtifactMissing, match="make image"):
        artifacts.image()


def test_qemu_override_must_exist(tmp_path):
    with pytest.raises(artifacts.CZoneError, match="does not exist"):
        artifacts.qemu_binary(tmp_path / "nope")


def test_cli_entry_prints_key(capsys):
    assert artifacts.main(["artifacts.py", "key", "image"]) == 0
    assert len(capsys.readouterr().out.strip()) == 12
    assert artifacts.main(["artifacts.py", "key", "bogus"]) == 2


def test_shared_header_comes_from_the_kernel_series() -> None:
    text = artifacts.shared_header()
    assert "#define VIRTIO_ID_CZONE" in text
    assert text.endswith("#endif /* _LINUX_VIRTIO_CZONE_H */\n")


def test_qemu_key_follows_the_shared_header(tmp_path) -> None:
    series = tmp_path / artifacts.KERNEL_SERIES
    series.mkdir(parents=True)
    patch = series / "0001-x.patch"
    body = ("--- /dev/null\n+++ b/include/uapi/linux/virtio_czone.h\n@@ -0,0 +1,2 @@\n"
            "+#define VIRTIO_ID_CZONE {}\n+\ndiff --git a/x b/x\n")
    patch.write_text(body.format(60))
    assert artifacts.shared_header(tmp_path) == "#define VIRTIO_ID_CZONE 60\n\n"
    k = artifacts.input_key("qemu", tmp_path)
    patch.write_text(body.format(61))
    assert artifacts.input_key("qemu", tmp_path) != k
    # A later patch of the series that changes the header changes it too.
    (series / "0002-y.patch").write_text(
        "--- a/include/uapi/linux/virtio_czone.h\n+++ b/include/uapi/linux/virtio_czone.h\n"
        "@@ -1,2 +1,2 @@\n-#define VIRTIO_ID_CZONE 61\n+#define VIRTIO_ID_CZONE 62\n \n")
    assert artifacts.shared_header(tmp_path) == "#define VIRTIO_ID_CZONE 62\n\n"
    for p in series.iterdir():
        p.unlink()
    with pytest.raises(artifacts.CZoneError, match="no include/uapi/linux/virtio_czone.h"):
        artifacts.shared_header(tmp_path)

"""Weight archives from a registry are untrusted: crafted ones must not write outside their folder."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from clearml_umem.clearml_io.archives import UnsafeArchive, extract_archive


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def make_tar(path: Path, build) -> Path:  # noqa: ANN001 - a callback filling the archive
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


def outside_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and "dest" not in p.parts and p.suffix not in (".gz", ".zip")]


def test_a_plain_model_archive_extracts(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("model")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        add_file(tar, "model/config.json", b"{}")
        add_file(tar, "model/model.safetensors", b"\0" * 100)

    dest = extract_archive(make_tar(tmp_path / "m.tar.gz", build), tmp_path / "dest")
    assert (dest / "model" / "config.json").read_bytes() == b"{}"
    assert (dest / "model" / "model.safetensors").stat().st_size == 100


def test_symlink_chain_that_climbs_is_refused(tmp_path: Path) -> None:
    """L0 -> ., Lk -> L(k-1)/.., then a file under L39/...: the escape the SDK let through."""
    victim = tmp_path / "victim.txt"

    def build(tar: tarfile.TarFile) -> None:
        add_link(tar, "L0", ".")
        for k in range(1, 40):
            add_link(tar, f"L{k}", f"L{k - 1}/..")
        add_file(tar, "L39/" + str(victim).lstrip("/"), b"pwned")

    with pytest.raises(UnsafeArchive, match="symlink"):
        extract_archive(make_tar(tmp_path / "evil.tar.gz", build), tmp_path / "work" / "dest")
    assert not victim.exists() and not (tmp_path / "work" / "dest").exists()
    assert not [p for p in (tmp_path / "work").iterdir()], "no half-extracted folder left behind"


@pytest.mark.parametrize(("name", "why"), [("up/../x", "'..'"), ("../x", "'..'"), ("/tmp/abs-umem-test", "absolute")])
def test_paths_that_climb_or_are_absolute_are_refused(tmp_path: Path, name: str, why: str) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_link(tar, "up", ".") if name.startswith("up") else None
        add_file(tar, name, b"pwned")

    with pytest.raises(UnsafeArchive, match="symlink" if name.startswith("up") else why):
        extract_archive(make_tar(tmp_path / "evil.tar.gz", build), tmp_path / "w" / "dest")
    assert not (tmp_path / "x").exists() and not (tmp_path / "w" / "x").exists()
    assert not Path("/tmp/abs-umem-test").exists()


def test_hard_links_and_devices_are_refused(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "a", b"1")
        add_link(tar, "b", "/etc/passwd", tarfile.LNKTYPE)

    with pytest.raises(UnsafeArchive, match="hard link"):
        extract_archive(make_tar(tmp_path / "evil.tar.gz", build), tmp_path / "dest")


def make_zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(("members", "why"), [
    ([("../x", b"pwned", None)], "'..'"),
    ([("/abs", b"pwned", None)], "absolute"),
    ([("link", b"/etc", stat.S_IFLNK | 0o777)], "symlink"),
])
def test_crafted_zips_are_refused(tmp_path: Path, members: list, why: str) -> None:
    with pytest.raises(UnsafeArchive, match=why):
        extract_archive(make_zip(tmp_path / "evil.zip", members), tmp_path / "w" / "dest")
    assert not (tmp_path / "w" / "x").exists() and not (tmp_path / "x").exists()


def test_a_zip_bomb_is_refused_before_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clearml_umem.clearml_io.archives as archives

    monkeypatch.setattr(archives, "MIN_ALLOWANCE", 1)
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * (8 * 2**20))
    with pytest.raises(UnsafeArchive, match="unpacks to more than"):
        extract_archive(path, tmp_path / "w" / "dest")
    assert not (tmp_path / "w" / "dest").exists()


def test_a_good_zip_extracts(tmp_path: Path) -> None:
    dest = extract_archive(make_zip(tmp_path / "ok.zip", [("m/config.json", b"{}", None)]), tmp_path / "dest")
    assert (dest / "m" / "config.json").read_bytes() == b"{}"

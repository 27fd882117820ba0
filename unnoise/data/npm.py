"""Files from the npm registry: ``npm pack`` into a cache folder, checked against a pinned sha256."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from unnoise.files import file_sha256

NPM_TIMEOUT_S = 600


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$UNNOISE_CACHE``, else ``~/.cache/unnoise``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("UNNOISE_CACHE") or Path.home() / ".cache" / "unnoise")


def fetch_npm_tarball(spec: str, dest: Path, sha256: str) -> Path:
    """Download npm package ``spec`` ("name@version") with ``npm pack``, check its sha256 and move it to ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm was not found on PATH; it is needed once to download the npm package {spec}. Install Node.js, "
            f"which includes npm (https://nodejs.org, or `apt-get install npm`), or place {dest.name} in {dest.parent}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            subprocess.run(
                [npm, "pack", spec, "--silent", "--ignore-scripts"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=NPM_TIMEOUT_S,
            )
        except subprocess.CalledProcessError as e:
            stderr = e.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"`npm pack {spec}` failed with exit code {e.returncode}: {stderr}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`npm pack {spec}` did not finish within {NPM_TIMEOUT_S} s") from None
        packed = list(Path(tmp).glob("*.tgz"))
        if len(packed) != 1:
            raise RuntimeError(f"`npm pack {spec}` did not write one tarball; it wrote {os.listdir(tmp)}")
        verify_sha256(packed[0], sha256, spec)
        os.replace(packed[0], dest)
    return dest


def verify_sha256(path: Path, expected: str, source: str) -> None:
    """Raise unless the file's sha256 equals ``expected``; ``source`` names where the file should come from."""
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; the file is corrupt or not "
            f"{source}: delete it to download it again"
        )


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary, shareable file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

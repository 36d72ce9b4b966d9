"""Hard-link installed distributions from one venv into another, so a second venv does not store a second copy.

The CUDA build of torch with its nvidia-* and triton wheels takes 5.4 GB per venv; CI's disk is not always large
enough for two copies. pip treats the linked distributions as installed (their dist-info comes along) and installs
only what is missing. pip never writes into an installed file: it unlinks and writes anew, so one venv's upgrade or
uninstall never changes the other's files.

Usage: python share_packages.py SOURCE_SITE_PACKAGES DEST_SITE_PACKAGES NAME_PATTERN...
"""

import fnmatch
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path


def share(source: Path, dest: Path, patterns: list[str]) -> None:
    """Link (or, across file systems, copy) every file of the matching distributions from source into dest."""
    linked = {}
    for dist in metadata.distributions(path=[str(source)]):
        name = dist.metadata["Name"].lower()
        if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns) or name in linked:
            continue
        count = 0
        for file in dist.files or []:
            if file.parts[0] == "..":  # console scripts: their shebang names the source venv's python
                continue
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            try:
                os.link(source / file, target)
            except OSError:
                shutil.copy2(source / file, target)
            count += 1
        linked[name] = count
    missing = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in linked)]
    if missing:
        sys.exit(f"share_packages: no distribution in {source} matches {missing}")
    print(f"share_packages: {len(linked)} distributions, {sum(linked.values())} files linked into {dest}")


if __name__ == "__main__":
    share(Path(sys.argv[1]), Path(sys.argv[2]), [p.lower() for p in sys.argv[3:]])

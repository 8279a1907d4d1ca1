"""Make transformers' own model-test mixins importable, for the version of transformers that is installed.

The wheel ships no tests; the sdist on the package index ships `tests/*.py` at the top level (`test_modeling_common.py`,
`test_configuration_common.py`, the training / tensor-parallel mixins) but not the modules a few of them import
(`tests/generation/test_utils.py`, `tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py`,
`tests/distributed_testing_utils.py`). This downloads the sdist with pip, extracts `tests/*.py` into
`.transformers_tests/<version>/transformers_tests/` (gitignored) and puts the stand-ins from `shims/` at those paths.

    python tests/transformers_mixins/fetch.py     # CI runs this before pytest; a no-op once the version is there

`tests/test_transformers_mixins.py` calls `ensure_transformers_tests()` itself too, so a plain `pytest` works wherever
the package index can be reached.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO_ROOT / ".transformers_tests"
PACKAGE = "transformers_tests"
SHIMS = Path(__file__).resolve().parent / "shims"
# Stand-ins for the modules the sdist's tests import but the sdist does not ship: shim file -> path in the package.
SHIM_TARGETS = {
    "generation_test_utils.py": "generation/test_utils.py",
    "exporters_test_export.py": "exporters/test_export.py",
    "utils_test_configuration_utils.py": "utils/test_configuration_utils.py",
    "distributed_testing_utils.py": "distributed_testing_utils.py",
}
COMPLETE_MARKER = ".extracted"


class TransformersTestsUnavailable(RuntimeError):
    """The sdist of the installed transformers could not be downloaded or does not hold the test files."""


def installed_transformers_version() -> str:
    return importlib.metadata.version("transformers")


def ensure_transformers_tests(version: str | None = None) -> Path:
    """The folder to put on `sys.path` to import `transformers_tests.test_modeling_common` (and friends) of
    `version` (default: the installed transformers). Downloads and extracts the sdist once; refreshes the shims."""
    version = version or installed_transformers_version()
    root = CACHE_ROOT / version
    package = root / PACKAGE
    if not (package / COMPLETE_MARKER).is_file():
        _extract_sdist_tests(version, root)
    _install_shims(package)
    return root


def _extract_sdist_tests(version: str, root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root.parent) as scratch:
        scratch = Path(scratch)
        sdist = _download_sdist(version, scratch / "download")
        staging = scratch / "staging" / PACKAGE
        staging.mkdir(parents=True)
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/tests/"
        with tarfile.open(sdist) as archive:
            members = [
                m for m in archive.getmembers()
                if m.isfile() and m.name.startswith(prefix) and "/" not in m.name[len(prefix):]
                and m.name.endswith(".py")
            ]  # fmt: skip
            if not any(m.name.endswith("/test_modeling_common.py") for m in members):
                raise TransformersTestsUnavailable(f"{sdist.name} has no tests/test_modeling_common.py")
            for member in members:
                source = archive.extractfile(member)
                (staging / Path(member.name).name).write_bytes(source.read())
        # Executed once more by `direct_transformers_import(tests dir)` in test_configuration_common: keep it empty.
        (staging / "__init__.py").write_text("")
        (staging / COMPLETE_MARKER).write_text(f"transformers {version} sdist: {sdist.name}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging.parent, root)


def _download_sdist(version: str, destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--timeout", "30", "--retries", "2", f"transformers=={version}", "--dest", str(destination),
    ]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    archives = sorted(destination.glob("transformers-*.tar.gz")) if destination.is_dir() else []
    if result.returncode != 0 or not archives:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive"]
        raise TransformersTestsUnavailable(
            f"could not download the transformers=={version} sdist with pip ({detail[0]})"
        )
    return archives[0]


def _install_shims(package: Path) -> None:
    for shim, target in SHIM_TARGETS.items():
        destination = package / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.parent != package:
            (destination.parent / "__init__.py").touch()
        contents = (SHIMS / shim).read_bytes()
        if not destination.is_file() or destination.read_bytes() != contents:
            destination.write_bytes(contents)


if __name__ == "__main__":
    try:
        location = ensure_transformers_tests(sys.argv[1] if len(sys.argv) > 1 else None)
    except TransformersTestsUnavailable as err:
        sys.exit(f"error: {err}; check that the package index is reachable.")
    print(f"transformers' test mixins: {location / PACKAGE}")

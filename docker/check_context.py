"""Check the Docker build context and the Dockerfiles without a Docker engine.

    python docker/check_context.py

1. The context: the repo's files (``git ls-files``: tracked, and untracked
   ones git does not ignore) that ``.dockerignore`` lets through, with
   Docker's rules for the patterns used here.
2. Every COPY/ADD source of docker/Dockerfile.{rocm,cuda} is in the context.
3. Nothing large or private goes in: no file over 5 MB, nothing of .venv,
   .scratch, benchmarks, tests or .git.
4. The context builds a wheel with the plugin, its kernels and its entry points.
5. Each Dockerfile's base is ``${BASE_IMAGE}``, whose default is a vLLM 0.32.x
   or 0.33.x image (the versions fly_vllm.plugin.check_vllm_version accepts).

Prints one line per check and exits 1 if any fails. Standard library only.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.metadata
import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("docker/Dockerfile.rocm", "docker/Dockerfile.cuda")
MAX_FILE_BYTES = 5 * 1024 * 1024
FORBIDDEN_DIRS = (".venv", ".scratch", "benchmarks", "tests", ".git")
WHEEL_FILES = ("fly_vllm/plugin.py", "fly_vllm/kernels/fly_verify.py")
ENTRY_POINTS = {
    ("vllm.general_plugins", "fly"): "fly_vllm.plugin:register",
    ("console_scripts", "fly-vllm"): "fly_vllm.cli:main",
}
SUPPORTED_VLLM = ((0, 32), (0, 33))

Pattern = tuple[bool, "re.Pattern[str]"]  # (re-include?, regex of the path)


# --- .dockerignore ----------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's path pattern as a regex: ``*`` and ``?`` stay inside one path
    segment, ``**`` spans any number of segments (``**/`` also none)."""
    if "[" in pattern or "\\" in pattern:
        raise ValueError(f"unsupported .dockerignore pattern {pattern!r}")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            c = pattern[i]
            out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def parse_dockerignore(text: str) -> list[Pattern]:
    """The patterns of a .dockerignore, in order (comments and blanks dropped)."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        line = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((include, _pattern_regex(line)))
    return patterns


def is_included(path: str, patterns: list[Pattern]) -> bool:
    """Whether `path` is in the build context: a pattern applies if it matches
    the path or one of its parent directories; the last one that applies wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for include, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            included = include
    return included


def context_files(root: Path, patterns: list[Pattern]) -> list[str]:
    """Files of the repo at `root` (tracked, or untracked and not ignored by
    git) that the patterns let into the build context."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    paths = {p for p in out.split("\0") if p and (root / p).is_file()}
    return sorted(p for p in paths if is_included(p, patterns))


def check_forbidden(root: Path, patterns: list[Pattern], files: list[str]) -> list[str]:
    """Files over 5 MB, and anything of FORBIDDEN_DIRS that the patterns let in
    (also probed with a made-up file, as those folders are mostly untracked)."""
    problems = []
    for d in FORBIDDEN_DIRS:
        leaks = [f for f in files if f.split("/")[0] == d]
        if leaks or is_included(f"{d}/x", patterns):
            example = (leaks or [f"{d}/x"])[0]
            problems.append(f"{d}/ is not kept out of the context (e.g. {example})")
    for f in files:
        size = (root / f).stat().st_size
        if size > MAX_FILE_BYTES:
            problems.append(f"{f} is {size / 2**20:.1f} MB (over 5 MB)")
    return problems


# --- Dockerfiles ------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined,
    comments and blank lines dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        name, _, args = (buf + s).partition(" ")
        out.append((name.upper(), args.strip()))
        buf = ""
    return out


def copy_sources(text: str) -> list[str]:
    """Build-context sources of the COPY/ADD instructions (not --from= copies,
    not URLs), normalised: no leading ./, no trailing /."""
    sources = []
    for name, args in instructions(text):
        if name not in ("COPY", "ADD"):
            continue
        flags = []
        while args.startswith("--"):
            flag, _, args = args.partition(" ")
            flags.append(flag)
            args = args.lstrip()
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = json.loads(args) if args.startswith("[") else shlex.split(args)
        if len(paths) < 2:
            raise ValueError(f"{name} {args}: needs a source and a destination")
        for src in paths[:-1]:
            if not re.match(r"(https?|git)[:@]", src):
                sources.append(posixpath.normpath(src).lstrip("/"))
    return sources


def check_copy_sources(text: str, files: list[str]) -> list[str]:
    """COPY/ADD sources missing from the context (a folder needs a file in it)."""
    problems = []
    for src in copy_sources(text):
        found = src == "." or any(
            f == src or f.startswith(src + "/") or fnmatch.fnmatchcase(f, src) for f in files
        )
        if not found:
            problems.append(
                f"COPY source {src!r} is not in the build context "
                "(.dockerignore excludes it, or the repo lacks it)"
            )
    return problems


def check_base_image(text: str) -> list[str]:
    """FROM ${BASE_IMAGE}, with an ARG default on vLLM 0.32.x or 0.33.x."""
    steps = instructions(text)
    froms = [args for name, args in steps if name == "FROM"]
    if not froms or froms[0].split()[0] != "${BASE_IMAGE}":
        return [f"FROM must be ${{BASE_IMAGE}}; got {froms[:1]}"]
    defaults = [
        args.partition("=")[2]
        for name, args in steps
        if name == "ARG" and args.startswith("BASE_IMAGE=")
    ]
    if not defaults:
        return ["no ARG BASE_IMAGE=<image> default"]
    image = defaults[0].strip("\"'")
    tag = image.rpartition(":")[2] if ":" in image else ""
    m = re.search(r"(?:^|vllm[_-])v?(\d+)\.(\d+)", tag)
    if not m or (int(m[1]), int(m[2])) not in SUPPORTED_VLLM:
        return [f"base image {image!r}: its tag is not a vLLM 0.32.x or 0.33.x release"]
    return []


# --- the wheel --------------------------------------------------------------


def _can_build_wheels_offline() -> bool:
    """setuptools here can build a wheel without fetching anything: it has
    bdist_wheel (>= 70.1) or the `wheel` package is installed."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None


def build_wheel(root: Path, files: list[str], out: Path) -> Path:
    """Build a wheel from a copy of the context files; return its path."""
    ctx = out / "context"
    for f in files:
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, ctx / f)
    isolation = ["--no-build-isolation"] if _can_build_wheels_offline() else []
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation]
    r = subprocess.run(
        [*cmd, "-w", str(out / "dist"), str(ctx)], capture_output=True, text=True, timeout=600
    )
    wheels = sorted((out / "dist").glob("*.whl"))
    if r.returncode or not wheels:
        raise RuntimeError(f"pip wheel failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return wheels[0]


def check_wheel(wheel: Path, files: list[str]) -> list[str]:
    """Problems of a built wheel: the plugin, the kernels, the entry points
    and every package of the context must be in it."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        ep_name = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        ep_text = z.read(ep_name).decode() if ep_name else ""
    problems = [f"{f} is not in the wheel" for f in WHEEL_FILES if f not in names]
    eps = configparser.ConfigParser(delimiters=("=",))
    eps.optionxform = str  # keep names as they are
    eps.read_string(ep_text)
    for (group, name), value in ENTRY_POINTS.items():
        got = eps.get(group, name, fallback=None)
        if got != value:
            problems.append(f"entry point {group}: {name} = {value} missing (got {got})")
    problems += [
        f"{posixpath.dirname(f)} is in the context but not in the wheel "
        "(pyproject.toml [tool.setuptools] packages)"
        for f in files
        if f.startswith("fly_vllm/") and f.endswith("/__init__.py") and f not in names
    ]
    return problems


# --- report -----------------------------------------------------------------


def main() -> int:
    patterns = parse_dockerignore((ROOT / ".dockerignore").read_text())
    files = context_files(ROOT, patterns)
    size = sum((ROOT / f).stat().st_size for f in files)
    print(f"build context: {len(files)} files, {size:,} bytes")
    dockerfiles = {d: (ROOT / d).read_text() for d in DOCKERFILES}

    results: list[tuple[str, list[str]]] = [
        (".dockerignore keeps out large and private files", check_forbidden(ROOT, patterns, files))
    ]
    for d, text in dockerfiles.items():
        results.append((f"{d}: COPY sources in the context", check_copy_sources(text, files)))
        results.append((f"{d}: base image", check_base_image(text)))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = build_wheel(ROOT, files, Path(tmp))
            problems = check_wheel(wheel, files)
            label = f"wheel {wheel.name}: plugin, kernels, entry points"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            problems, label = [str(e)], "wheel from the context"
        results.append((label, problems))

    for label, problems in results:
        print(f"{'FAIL' if problems else 'OK  '} {label}")
        for p in problems:
            print(f"       {p}")
    failed = sum(bool(p) for _, p in results)
    if failed:
        print(f"check_context: {failed} check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

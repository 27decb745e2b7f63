"""What the production images must be, checked without a Docker daemon (none runs on this
project's machines). For every Dockerfile given:

- several stages; the last one (the runtime image) is named ``runtime``, runs as a fixed
  non-root numeric UID, has a HEALTHCHECK, exposes the gRPC port 50051, stops with SIGTERM,
  copies only from other stages (no source tree, no .git) and installs no compiler or build
  tool;
- every file the build stages COPY from the context is in the build context that
  ``.dockerignore`` lets through (computed the way docker-py sends it).

Then, unless --no-build: the build context is materialised (docker-py's own tar of it) and
the build stage's install step is replayed on it with this Python (``pip wheel
--no-build-isolation``, torch already installed): the context alone builds gramstyle with
its compiled op.

    python .ci/check_dockerfiles.py Dockerfile Dockerfile.cuda
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from docker.utils.build import tar as context_tar

ROOT = Path(__file__).resolve().parents[1]

#: Packages that must not be installed in a runtime stage.
BUILD_TOOLS = re.compile(r"(?<![\w.-])(g\+\+|gcc|clang|build-essential|make|cmake|ninja|"
                         r"nvcc|cuda-nvcc[\w.-]*|cuda-toolkit[\w.-]*|git|[\w.+-]+-dev)(?![\w.-])")


def instructions(path: Path) -> list[tuple[int, str, str]]:
    """(line, KEYWORD, arguments) of each instruction; continuations joined, comments and
    parser directives dropped."""
    out, buffer, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        buffer = ""
    return out


def stages(path: Path) -> list[tuple[str, list[tuple[int, str, str]]]]:
    """(name, instructions) per stage."""
    result: list[tuple[str, list]] = []
    for item in instructions(path):
        if item[1] == "FROM":
            words = item[2].split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else ""
            result.append((name, []))
        elif result:
            result[-1][1].append(item)
    return result


def copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def check(path: Path, context_files: set[str]) -> list[str]:
    problems = []
    every = stages(path)
    if len(every) < 2:
        return [f"{path.name}: one stage; the compiler must stay in a build stage"]
    name, final = every[-1]
    where = f"{path.name} (stage {name or 'last'})"
    if name != "runtime":
        problems.append(f"{path.name}: the last stage is {name!r}, expected 'runtime'")
    by_keyword: dict[str, list[tuple[int, str]]] = {}
    for line, keyword, args in final:
        by_keyword.setdefault(keyword, []).append((line, args))
    users = by_keyword.get("USER", [])
    if not users:
        problems.append(f"{where}: no USER: it would run as root")
    else:
        uid = users[-1][1].split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"{where}: USER {users[-1][1]!r} is not a fixed non-root UID")
    health = by_keyword.get("HEALTHCHECK", [])
    if not health or health[-1][1].upper().startswith("NONE"):
        problems.append(f"{where}: no HEALTHCHECK")
    exposed = " ".join(args for _, args in by_keyword.get("EXPOSE", [])).split()
    if "50051" not in exposed:
        problems.append(f"{where}: the gRPC port 50051 is not exposed")
    if [args for _, args in by_keyword.get("STOPSIGNAL", [])][-1:] != ["SIGTERM"]:
        problems.append(f"{where}: STOPSIGNAL is not SIGTERM (the server drains on it)")
    for line, _args in by_keyword.get("ADD", []):
        problems.append(f"{where}:{line}: ADD brings files from outside the build stages")
    for line, args in by_keyword.get("COPY", []):
        if "--from=" not in args:
            problems.append(f"{where}:{line}: COPY from the build context ({args}): the "
                            "runtime image gets files only from the build stage")
    for line, args in by_keyword.get("RUN", []):
        for install in re.findall(r"(?:apt-get|apt|yum|dnf|apk)\s+(?:install|add)\s+([^&;|]*)",
                                  args):
            for tool in BUILD_TOOLS.findall(install):
                problems.append(f"{where}:{line}: installs the build tool {tool!r}")
    for _name, body in every[:-1]:
        for line, keyword, args in body:
            if keyword in ("COPY", "ADD") and "--from=" not in args:
                for source in copy_sources(args):
                    source = source.rstrip("/").removeprefix("./")
                    if source == ".":
                        problems.append(f"{path.name}:{line}: COPY . copies the whole context")
                    elif not any(f == source or f.startswith(source + "/")
                                 for f in context_files):
                        problems.append(f"{path.name}:{line}: {source!r} is not in the build "
                                        "context (.dockerignore leaves it out, or it is "
                                        "missing)")
    return problems


def build_wheel(context: Path, out: Path) -> None:
    """Replay the build stage's install on the context: build the wheel with the op."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(context)], check=True)
    wheel = next(out.glob("gramstyle-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    if not any(re.match(r"gramstyle/kernels/_C.*\.so$", n) for n in names):
        raise SystemExit(f"check_dockerfiles: {wheel.name} has no compiled op")
    if not any(n.startswith("gramstyle/v1/gramstyle_pb2") for n in names):
        raise SystemExit(f"check_dockerfiles: {wheel.name} has no generated stubs")
    print(f"check_dockerfiles: the build context alone builds {wheel.name} with the compiled op")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dockerfiles", nargs="+", type=Path)
    parser.add_argument("--no-build", action="store_true",
                        help="skip building the wheel from the context")
    args = parser.parse_args()
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    with tempfile.TemporaryDirectory(prefix="gramstyle-context-") as tmp:
        tmp_path = Path(tmp)
        with context_tar(str(ROOT), exclude=patterns) as archive, \
                tarfile.open(fileobj=archive) as members:
            files = {m.name for m in members.getmembers() if m.isfile()}
            members.extractall(tmp_path / "context", filter="data")
        leaked = sorted(f for f in files if f.startswith((".git/", ".venv/")) or "/.git/" in f)
        problems = [f".dockerignore lets {f} into the build context" for f in leaked[:5]]
        for dockerfile in args.dockerfiles:
            problems += check(dockerfile, files)
        for problem in problems:
            print(f"check_dockerfiles: {problem}", file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(f"check_dockerfiles: {', '.join(str(d) for d in args.dockerfiles)}: multi-stage, "
              f"non-root runtime with HEALTHCHECK, no build tools; the context ({len(files)} "
              "files) has every COPY source")
        if not args.no_build:
            build_wheel(tmp_path / "context", tmp_path / "wheels")


if __name__ == "__main__":
    main()

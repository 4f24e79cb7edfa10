"""Regenerate the client stubs of the contract in protos/: Python, TypeScript, Go.

The only way the generated files under clients/ are made: never edit them by
hand. CI runs this script (make stubs-check) and fails on any diff.

Python: protoc (grpc_tools) with mypy-protobuf into
clients/python/src/cachecoord_client/proto/. protoc names modules after the
proto path (`cachecoord.v1`), which would collide with the server package
`cachecoord`, so the imports are rewritten to live under
`cachecoord_client.proto`.

TypeScript and Go: `buf generate` with buf.gen.yaml, whose plugins are local
binaries (buf compiles the protos itself): ts-proto for @grpc/grpc-js into
clients/node/src/gen/, Debian's protoc-gen-go and protoc-gen-go-grpc into
clients/go/cachecoordv1/. The plugins' versions are written into the files,
so they are pinned (PLUGIN_VERSIONS) and checked before anything is written.

Run: python scripts/gen_protos.py   (make stubs installs the plugins first)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "clients" / "python" / "src" / "cachecoord_client" / "proto"
PREFIX = "cachecoord_client.proto."
BIN = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside python

TOOLS = ROOT / "tools" / "node_modules"
BUF = TOOLS / ".bin" / "buf"
# Generated folder -> (plugin, what it is), as buf.gen.yaml writes them.
BUF_OUTPUTS = {
    ROOT / "clients" / "node" / "src" / "gen": "TypeScript (ts-proto)",
    ROOT / "clients" / "go" / "cachecoordv1": "Go (protoc-gen-go, protoc-gen-go-grpc)",
}
# What `--version` prints for Debian bookworm's plugins (packages protoc-gen-go
# and protoc-gen-go-grpc); another version would generate different files.
PLUGIN_VERSIONS = {
    "protoc-gen-go": "protoc-gen-go v1.28.1",
    "protoc-gen-go-grpc": "protoc-gen-go-grpc 1.0",
}
INSTALL_HINT = (
    "run `make tools` (npm ci in tools/, apt-get install protoc-gen-go protoc-gen-go-grpc)"
)


class PluginError(RuntimeError):
    """A code generator is missing or not the pinned version."""


def main() -> None:
    generate_python()
    try:
        generate_buf()
    except PluginError as err:
        sys.exit(f"gen_protos: {err}")


def generate_python() -> None:
    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={PROTOS}",
                f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                *sources,
            ],
            check=True,
        )
        if OUT.exists():
            shutil.rmtree(OUT)
        for path in sorted(Path(tmp).rglob("*.py*")):
            target = OUT / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite_imports(path.read_text()))
    for package in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (package / "__init__.py").touch()


def generate_buf() -> None:
    """TypeScript and Go through `buf generate`, into a temporary folder first
    so that a failing plugin leaves the committed stubs as they were."""
    check_plugins()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [str(BUF), "generate", "--template", "buf.gen.yaml", "--output", tmp],
            cwd=ROOT,
            check=True,
        )
        for target in BUF_OUTPUTS:
            produced = Path(tmp) / target.relative_to(ROOT)
            if not produced.is_dir():
                raise PluginError(f"buf generate wrote nothing into {target.relative_to(ROOT)}")
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(produced, target)


def check_plugins() -> None:
    if not BUF.exists():
        raise PluginError(f"{BUF.relative_to(ROOT)} is missing: {INSTALL_HINT}")
    pinned = json.loads((ROOT / "tools" / "package.json").read_text())["dependencies"]["ts-proto"]
    ts_proto = TOOLS / "ts-proto" / "package.json"
    installed = json.loads(ts_proto.read_text())["version"] if ts_proto.exists() else None
    if installed != pinned:
        raise PluginError(
            f"ts-proto {pinned} is pinned but {installed} is installed: {INSTALL_HINT}"
        )
    for plugin, expected in PLUGIN_VERSIONS.items():
        path = shutil.which(plugin)
        if path is None:
            raise PluginError(f"{plugin} is not on PATH: {INSTALL_HINT}")
        found = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found != expected:
            raise PluginError(
                f"{path} prints {found!r}, the stubs are made with {expected!r} "
                "(Debian bookworm's package); install that version"
            )


def _rewrite_imports(text: str) -> str:
    text = re.sub(r"^from cachecoord\.", f"from {PREFIX}cachecoord.", text, flags=re.M)
    return re.sub(r"^import cachecoord\.", f"import {PREFIX}cachecoord.", text, flags=re.M)


if __name__ == "__main__":
    main()

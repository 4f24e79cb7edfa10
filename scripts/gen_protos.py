"""Regenerate the Python stubs of the contract in protos/.

The only way the files under clients/python/src/cachecoord_client/proto/ are
made: never edit them by hand. protoc names modules after the proto path
(`cachecoord.v1`), which would collide with the server package `cachecoord`,
so the imports are rewritten to live under `cachecoord_client.proto`.
Run: python scripts/gen_protos.py   (CI runs it and fails on any diff)
"""

from __future__ import annotations

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


def main() -> None:
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


def _rewrite_imports(text: str) -> str:
    text = re.sub(r"^from cachecoord\.", f"from {PREFIX}cachecoord.", text, flags=re.M)
    return re.sub(r"^import cachecoord\.", f"import {PREFIX}cachecoord.", text, flags=re.M)


if __name__ == "__main__":
    main()

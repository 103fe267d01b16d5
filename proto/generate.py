"""Generate the Python stubs (`*_pb2.py`, `*_pb2_grpc.py`) and their typed stubs (`.pyi`)
for proto/daert/v1 into OUT_DIR (normally `services/`): `python proto/generate.py services`.

Used by `make proto` and by the test that fails when the committed stubs are stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> None:
    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("daert/v1/*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        if not (bin_dir / plugin).exists() and shutil.which(plugin) is None:
            raise SystemExit(f"{plugin} not found: run `make setup` (it comes with mypy-protobuf)")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]))

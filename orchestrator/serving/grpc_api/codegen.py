"""Generate the Python stubs of `chat.proto` (grpcio-tools, a dev dependency).

The stubs are checked in, so serving needs only grpcio and protobuf; `tests/unit/test_grpc_convert.py`
regenerates them into a temporary directory and fails while they differ from the checked-in files.

    python -m orchestrator.serving.grpc_api.codegen          # rewrite the stubs beside chat.proto
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[2]
PROTO = PACKAGE_DIR / "chat.proto"
GENERATED = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py")


def generate(out_root: Path) -> dict[str, Path]:
    """Run protoc on chat.proto with the project root as include path (so the stubs import each
    other as `orchestrator.serving.grpc_api.chat_pb2`); returns the generated files by name."""
    from grpc_tools import protoc

    rel = PROTO.relative_to(ROOT)
    out_root.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                        f"--grpc_python_out={out_root}", str(rel)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    out_dir = out_root / rel.parent
    return {name: out_dir / name for name in GENERATED}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in generate(Path(tmp)).items():
            (PACKAGE_DIR / name).write_text(path.read_text())
            print(f"wrote {PACKAGE_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# On a GPU machine with Python and torch but no Java and no network: unpack the bundle that
# `make gpu-bundle` made, then run `make gpu-check`'s two steps (the GPU unit tests, ts-gpu-check)
# with that machine's own Python and torch. Everything it writes goes under $OUT.
#
#   OUT=/tmp/gpu-out scripts/gpu_device_run.sh                 # every archive in the bundle
#   scripts/gpu_device_run.sh --models digits,net_int8         # arguments go to ts-gpu-check
#
# Environment: BUNDLE (default gpu-bundle), PYTHON (default python3), OUT (default ./gpu-out),
# GPU_TESTS=0 skips the unit tests. Exit status: ts-gpu-check's, or the tests' if they failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BUNDLE=$(cd "${BUNDLE:-gpu-bundle}" && pwd) || { echo "no bundle: make gpu-bundle here first" >&2; exit 2; }
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/serveready-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "unpacking $BUNDLE into $WORK" >&2
tar -xJf "$BUNDLE/jre.tar.xz" -C "$WORK" && tar -xJf "$BUNDLE/site.tar.xz" -C "$WORK" || exit 2
# Small packages this Python lacks come from the bundle; those it has stay its own.
"$PYTHON" - "$WORK/site" <<'EOF' || exit 2
import importlib.util, json, shutil, sys
from pathlib import Path
site = Path(sys.argv[1])
fallback = site / "fallback"
for name, module in json.loads((fallback / "FALLBACK.json").read_text()).items():
    if importlib.util.find_spec(module) is None:
        shutil.copytree(fallback / name, site, dirs_exist_ok=True)
        print(f"  {name}: from the bundle", file=sys.stderr)
shutil.rmtree(fallback)
EOF
mkdir -p "$WORK/bin"
printf '#!%s\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' "$PYTHON" > "$WORK/bin/torchserve"
chmod +x "$WORK/bin/torchserve"
export JAVA_HOME="$WORK/jre" PYTHONPATH="$WORK/site" PATH="$WORK/bin:$WORK/jre/bin:$PATH"
# Python puts the current folder first on sys.path: in the repository, its serveready/ (the bare
# top package) would hide the bundle's whole one. So Python runs from the scratch folder, and
# pytest appends the repository (for tests/) instead of prepending it.
cd "$WORK"

"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import importlib, platform, subprocess, sys
print("python", sys.version.split()[0], platform.machine())
for module in ("torch", "ts", "serveready", "serveready.handlers", "serveready.scripts", "onnxruntime", "captum", "matplotlib", "numpy", "PIL", "sklearn", "yaml"):
    try:
        m = importlib.import_module(module)
        print(f"{module} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as err:  # report every missing piece, not the first
        print(f"{module}: MISSING ({type(err).__name__}: {err})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
try:
    import onnxruntime
    print("onnxruntime providers", onnxruntime.get_available_providers())
except ImportError:
    pass
print(subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0])
EOF

status=0
if [ "${GPU_TESTS:-1}" != 0 ]; then
  "$PYTHON" -m pytest -c "$REPO/setup.cfg" --rootdir "$REPO" --import-mode=append -m gpu -p no:cacheprovider -rA \
    "$REPO/tests/integration/test_gpu.py" 2>&1 | tee "$OUT/gpu-tests.txt"
  tests=${PIPESTATUS[0]}
  [ "$tests" = 5 ] && tests=0  # 5: nothing selected
fi
DATA=()
for f in "$BUNDLE"/data/*.pt; do [ -f "$f" ] && DATA+=(--data "$f"); done
"$PYTHON" -m serveready.scripts.gpu_check --model-store "$BUNDLE/model_store" --out "$OUT/check" --logs "$OUT/logs" \
  "${DATA[@]}" "$@" 2>&1 | tee "$OUT/check.log"
status=${PIPESTATUS[0]}
if [ "${tests:-0}" != 0 ] && [ "$status" = 0 ]; then status=$tests; fi
echo "gpu_device_run: done, status $status; report in $OUT/check.md" >&2
exit "$status"

#!/usr/bin/env bash
# Python packages that tunelab needs on a lent GPU machine but that its image ('cuda': Python 3.12, torch 2.11,
# transformers 5.17, lightning 2.6.6, peft, numpy, pandas, pyarrow, ... see the device KINDS.md package list) lacks.
# The machine has no network, so the wheels travel with the working tree in .whl/ (ignored by git; name it in `carry`).
#
#   bash benchmarks/device_setup.sh download      # HERE: fill .whl/ with the pinned set (skips what is there), print size
#   source benchmarks/device_setup.sh install     # ON THE DEVICE: install .whl/*.whl into /tmp/site, set PYTHONPATH
#                                                  # and the NCCL/NVLS variables, print the versions of the stack
#
# e.g. device run (carry [".whl"]):
#   source benchmarks/device_setup.sh install || exit 1; bash benchmarks/gpu_smoke.sh
#
# Overrides (for a local check on another Python): WHL_DIR (default .whl), PY_VERSION (default 3.12, the device's),
# SITE (default /tmp/site).
#
# Pins: what `make install` resolves (.venv), limited to the closure of what the image lacks. Each wheel's own
# Requires-Dist is covered either here or by the image (install uses --no-deps, so a gap shows only at import time).
# mlflow comes as mlflow-skinny: the same `mlflow` package (tracking client, SQLAlchemy store + alembic migrations)
# without the 8 MB web UI and the server-only deps (flask, gunicorn, graphene, docker, huey, skops); lightning's
# MLFlowLogger accepts it (it falls back to `import mlflow` when no `mlflow` distribution is installed).
PINS=(
  # Hydra: config composition + the Optuna sweeper plugin (1.4 line, pyproject.toml).
  hydra-core==1.4.0rc3
  omegaconf==2.4.1rc1                      # hydra-core 1.4.0rc3 needs >=2.4.1rc1; vendors its antlr4 runtime
  hydra-optuna-sweeper==1.4.0rc3
  # Optuna and its RDB storage (also used by sweep/storage.py / the MLflow sqlite store).
  optuna==5.0.0
  colorlog==6.12.0                         # optuna's logging
  sqlalchemy==2.1.9                        # optuna RDB storage, mlflow sqlite:/// store, sweep.storage.make_url
  alembic==1.20.1                          # schema migrations of optuna RDB and of mlflow's SQLAlchemy store
  mako==1.4.3                              # alembic's templates
  # MLflow tracking client (skinny: no UI; it already holds every file of mlflow-tracing, so that one is left out).
  mlflow-skinny==3.17.2
  cachetools==7.3.3                        # mlflow-skinny
  sqlparse==0.6.1                          # mlflow-skinny (search filter parsing)
  python-dotenv==1.2.4                     # mlflow-skinny
  importlib-metadata==9.1.0                # mlflow-skinny (zipp is in the image)
  gitpython==3.2.1                         # mlflow-skinny (source-version run tags)
  gitdb==4.0.12                            # gitpython
  smmap==5.0.3                             # gitdb
  pydantic==2.14.4                         # mlflow-skinny, fastapi
  pydantic-core==2.50.5                    # pydantic (binary, cp312)
  annotated-types==0.8.0                   # pydantic
  typing-inspection==0.4.5                 # pydantic
  typing-extensions==4.16.0                # pydantic needs >=4.16.0; image's version unknown, a newer one is harmless
  fastapi==0.165.0                         # mlflow-skinny (server bits it imports; anyio, annotated-doc in the image)
  starlette==1.10.0                        # mlflow-skinny, fastapi
  uvicorn==0.54.0                          # mlflow-skinny (h11, click in the image)
  opentelemetry-api==1.45.2                # mlflow-skinny (tracing)
  opentelemetry-sdk==1.45.2                # mlflow-skinny
  opentelemetry-proto==1.45.2              # mlflow-skinny (protobuf is in the image)
  opentelemetry-semantic-conventions==0.66b2  # opentelemetry-sdk
  databricks-sdk==0.162.0                  # mlflow-skinny (hard requirement, even without Databricks)
  google-auth==2.63.0                      # databricks-sdk
  pyasn1==0.6.5                            # google-auth
  pyasn1-modules==0.4.2                    # google-auth
  cryptography==50.0.2                     # google-auth (binary, abi3)
  cffi==2.1.1                              # cryptography (binary, cp312)
  pycparser==3.12                          # cffi
  # Hugging Face datasets (pyarrow >= 24, fsspec <= 2026.9.0, huggingface-hub >= 1.31 come from the image).
  datasets==5.2.0
  dill==0.4.1                              # datasets (<0.4.2)
  multiprocess==0.70.19                    # datasets (<0.70.20); its wheel is per Python version (py312)
  # GPU kernels (Triton; torch and triton are in the image).
  liger-kernel==0.8.5
  # precision=fp8: torchao's float8 training; 0.17 is the release built against the image's torch 2.11.
  torchao==0.17.0
  # peft=qlora: bitsandbytes; its wheel (43 MB) is cut to the CUDA 13.0 library the image's torch uses (4 MB).
  bitsandbytes==0.50.2
)

_ds_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL_DIR="${WHL_DIR:-$_ds_root/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
SITE="${SITE:-/tmp/site}"

_ds_keep_cuda130() {  # drops every native library of a bitsandbytes wheel but the CPU and CUDA 13.0 ones
  python3 - "$1" <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        name = os.path.basename(item.filename)
        if name.startswith("libbitsandbytes_") and name not in ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"):
            continue
        dst.writestr(item, src.read(item))
os.replace(path + ".tmp", path)
EOF
}

_ds_download() (
  set -euo pipefail
  shopt -s nullglob nocaseglob
  mkdir -p "$WHL_DIR"
  cd "$_ds_root"
  # The wheels must never be committed: keep .whl/ ignored even in a fresh clone.
  if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
  fi
  local pip_args=(--no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL_DIR")
  local keep=() pin name ver norm f out fetched=0
  for pin in "${PINS[@]}"; do
    name="${pin%%==*}"; ver="${pin#*==}"
    norm="$(echo "$name" | tr 'A-Z.-' 'a-z__')"   # wheel file names use the normalized project name
    keep+=("$norm")
    for f in "$WHL_DIR/$norm"-*.whl; do            # one version of each: drop another version's wheel
      case "$(basename "$f")" in "$norm-$ver-"*) ;; *) echo "removing $(basename "$f") (pinned: $ver)"; rm -f "$f";; esac
    done
    f=("$WHL_DIR/$norm-$ver-"*.whl)
    [ ${#f[@]} -gt 0 ] && continue
    if ! out="$(python3 -m pip download "${pip_args[@]}" "$pin" 2>&1)"; then
      echo "$out" | grep -v 'is ignored: it is neither' >&2; echo "download of $pin failed" >&2; exit 1
    fi
    f=("$WHL_DIR/$norm-$ver-"*.whl)
    [ ${#f[@]} -eq 1 ] || { echo "$pin: expected one wheel named $norm-$ver-*.whl in $WHL_DIR" >&2; exit 1; }
    [ "$norm" = bitsandbytes ] && _ds_keep_cuda130 "${f[0]}"
    echo "got $(basename "${f[0]}")"; fetched=$((fetched + 1))
  done
  for f in "$WHL_DIR"/*.whl; do                      # wheels of packages no longer pinned
    norm="$(basename "$f" | cut -d- -f1 | tr 'A-Z.-' 'a-z__')"
    [[ " ${keep[*]} " == *" $norm "* ]] || { echo "removing $(basename "$f") (not pinned)"; rm -f "$f"; }
  done
  local files=("$WHL_DIR"/*.whl)
  echo "$fetched downloaded, ${#files[@]} wheels for ${#PINS[@]} pins in $WHL_DIR:" \
    "$(du -cb "${files[@]}" | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}')"
  [ ${#files[@]} -eq ${#PINS[@]} ] || { echo "wheel count differs from the pin count" >&2; exit 1; }
)

_ds_install() {
  local whls=("$WHL_DIR"/*.whl)
  if [ ! -e "${whls[0]}" ]; then
    echo "device_setup: no wheels in $WHL_DIR (run 'bash benchmarks/device_setup.sh download' here, carry .whl)" >&2
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whls[@]}" \
    || { echo "device_setup: pip install into $SITE failed" >&2; return 1; }
  export PYTHONPATH="$SITE:$_ds_root/src"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
  # One line of versions; an import that fails shows as name=ERROR(...) and makes this return non-zero.
  python3 - <<'EOF'
import importlib, importlib.metadata as md, sys
mods = [("torch", "torch"), ("transformers", "transformers"), ("lightning", "lightning"), ("peft", "peft"),
        ("liger_kernel", "liger-kernel"), ("hydra", "hydra-core"), ("optuna", "optuna"), ("mlflow", "mlflow-skinny"),
        ("datasets", "datasets"), ("pyarrow", "pyarrow"), ("torchao", "torchao"),
        ("bitsandbytes", "bitsandbytes")]
out, bad = [], 0
for mod, dist in mods:
    try:
        m = importlib.import_module(mod)
        v = getattr(m, "__version__", None) or md.version(dist)
        out.append(f"{mod}={v}")
    except Exception as e:
        bad += 1
        out.append(f"{mod}=ERROR({type(e).__name__}: {e})")
print("device_setup: python " + sys.version.split()[0] + " " + " ".join(out), flush=True)
sys.exit(1 if bad else 0)
EOF
}

case "${1:-}" in
  download) _ds_download ;;
  install)
    if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
      echo "device_setup: run as 'source benchmarks/device_setup.sh install' so that PYTHONPATH stays set" >&2
    fi
    _ds_install ;;
  *) echo "usage: bash benchmarks/device_setup.sh download | source benchmarks/device_setup.sh install" >&2; false ;;
esac

#!/usr/bin/env bash
# Install hpcllm and everything it needs: system packages (when root), a virtualenv,
# torch, the Python dependencies and Horovod 0.28.1 built from source.
#
# Idempotent and cached: a stamp file in the venv makes a second run take about a second,
# and the Horovod wheel is cached per (Horovod, torch, Python, CPU/CUDA) outside the repo,
# so a fresh clone on the same machine does not rebuild it.
#
# Variables: VENV (.venv), PYTHON (python3), TORCH_SPEC (torch==2.13.0),
#            HPCLLM_CACHE (~/.cache/hpcllm), HOROVOD_VERSION (0.28.1).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
HPCLLM_CACHE=${HPCLLM_CACHE:-$HOME/.cache/hpcllm}

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

have_cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then have_cuda=1; fi

# Everything that decides what gets installed goes into the stamp: change any of it and
# the install runs again.
stamp_key=$(cat scripts/install.sh requirements.txt setup.py 2>/dev/null | sha256sum | cut -c1-16)
stamp_key="$stamp_key-$TORCH_SPEC-$HOROVOD_VERSION-cuda$have_cuda"
stamp="$VENV/.hpcllm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ] && [ -x "$VENV/bin/hpcllm" ]; then
    say "up to date ($VENV)"
    exit 0
fi

# ---------------------------------------------------------------- system packages
# command -> Debian package that provides it
declare -A need=(
    [mpicc]=libopenmpi-dev [mpirun]=openmpi-bin [cmake]=cmake [g++]=g++ [make]=make
    [slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [munged]=munge
)
missing=()
for cmd in "${!need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# The Slurm PMIx plugin is what makes `srun --mpi=pmix` start Open MPI ranks.
if ! ls /usr/lib/*/slurm-wlm/mpi_pmix.so >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    missing+=(slurm-wlm-basic-plugins)
fi
# ... and that plugin dlopen()s the unversioned libpmix.so, which only libpmix-dev ships.
# (one ls per pattern: ls fails when any of its arguments is missing)
if ! { ls /usr/lib/*/libpmix.so || ls /usr/lib/libpmix.so; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    missing+=(libpmix-dev)
fi
# torch.compile (--compile) builds C++ kernels against the interpreter's headers
if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        && command -v apt-get >/dev/null 2>&1; then
    missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=$(printf '%s\n' "${missing[@]}" openmpi-bin libopenmpi-dev | sort -u | tr '\n' ' ')
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages: $pkgs"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $pkgs build-essential munge slurm-wlm >/dev/null
    else
        cat >&2 <<EOF
[install] error: missing system packages: $pkgs
  Install them as root:   sudo apt-get install -y $pkgs build-essential munge slurm-wlm libpmix-dev
  Or, on a cluster login node, load modules instead, e.g.:
                          module load openmpi/4 cmake gcc   (then run 'make install' again)
EOF
        exit 1
    fi
fi

cmake_major=$(cmake --version | awk 'NR==1{split($3,v,"."); print v[1]}')
[ "$cmake_major" -lt 4 ] || export CMAKE_POLICY_VERSION_MINIMUM=3.5  # cmake 4 breaks Horovod's vendored gloo

# ---------------------------------------------------------------- virtualenv + Python deps
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# pip, minus the warning this machine's pip.conf prints for each index directory it lacks
pip_quiet() {
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip=(pip_quiet)

if [ "$have_cuda" = 1 ]; then
    # PyPI's Linux torch wheels are CUDA builds; ignore any local CPU-only wheel directory.
    say "CUDA found (nvidia-smi): installing a CUDA build of $TORCH_SPEC"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "${pip[@]}" install "$TORCH_SPEC"
else
    say "installing $TORCH_SPEC"
    "${pip[@]}" install "$TORCH_SPEC"
fi
say "installing Python dependencies (requirements.txt)"
"${pip[@]}" install -r requirements.txt

# ---------------------------------------------------------------- Horovod from source
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
torch_ver=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
variant=cpu; [ "$have_cuda" = 1 ] && variant=cuda
wheel_dir="$HPCLLM_CACHE/wheels/horovod-$HOROVOD_VERSION-torch$torch_ver-$py_tag-$variant"

hvd_ok() { "$VENV/bin/python" -c "import horovod.torch" >/dev/null 2>&1; }
if ! hvd_ok || [ ! -f "$VENV/.horovod-from-$(basename "$wheel_dir")" ]; then
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        say "building Horovod $HOROVOD_VERSION from source against torch $torch_ver (about 6 minutes on 2 cores)"
        # Horovod's CMake pins -std=c++14 but torch >= 2.1 headers need C++17: a compiler
        # wrapper rewrites the flag on every compile.
        wrap=$(mktemp -d)
        for cc in g++ c++; do
            cat > "$wrap/$cc" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do [ "\$a" = "-std=c++14" ] && a="-std=c++17"; args+=("\$a"); done
exec /usr/bin/$cc "\${args[@]}"
EOF
            chmod +x "$wrap/$cc"
        done
        build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
                   HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
                   CXX="$wrap/g++" CC=gcc MAKEFLAGS="-j$(nproc)")
        [ "$have_cuda" = 1 ] && build_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
        mkdir -p "$wheel_dir.tmp"
        log="$HPCLLM_CACHE/horovod-build.log"
        if ! env "${build_env[@]}" "$VENV/bin/python" -m pip --disable-pip-version-check -q wheel --no-build-isolation --no-deps \
                -w "$wheel_dir.tmp" "horovod==$HOROVOD_VERSION" >"$log" 2>&1; then
            tail -40 "$log" >&2
            die "Horovod build failed; full log: $log"
        fi
        rm -rf "$wrap" "$wheel_dir"
        mv "$wheel_dir.tmp" "$wheel_dir"   # a complete wheel dir or none
    else
        say "using cached Horovod wheel from $wheel_dir"
    fi
    "${pip[@]}" install --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
    # Horovod's own runtime deps (cloudpickle, psutil, pyyaml, packaging) without touching torch.
    "${pip[@]}" install cloudpickle psutil pyyaml packaging
    rm -f "$VENV"/.horovod-from-*
    touch "$VENV/.horovod-from-$(basename "$wheel_dir")"
fi

check=$("$VENV/bin/horovodrun" --check-build 2>&1) || true
if ! grep -q '\[X\] PyTorch' <<<"$check" || ! grep -q '\[X\] MPI' <<<"$check"; then
    echo "$check" >&2
    die "horovodrun --check-build does not list PyTorch and MPI"
fi

# ---------------------------------------------------------------- hpcllm itself
say "installing hpcllm (editable)"
"${pip[@]}" install --no-deps --no-build-isolation -e .
echo "$stamp_key" > "$stamp"
say "done: $("$VENV/bin/hpcllm" --version)"

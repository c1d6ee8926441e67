#!/usr/bin/env bash
# Stage vLLM for CUDA on the GPU machine (run HERE, in the project root; needs pip and network, no GPU).
#
# Resolves vllm==$VLLM_VERSION for CPython 3.12 / manylinux x86_64 (the GPU machine's Python), downloads the wheels
# that the GPU machine's image lacks (or holds in versions vLLM refuses) and packs them into parts of at most
# $PART_MIB MiB under .device/vllm/ (git-ignored): one tar of all the wheels, cut with `split`, so a big wheel
# (vllm itself is ~244 MB) spans parts and is rejoined there by bench/device/restore_vllm.sh.
#
#   bash bench/device/stage_vllm.sh            # → .device/vllm/part-00 … part-NN, wheels.txt, SHA256SUMS
#
# What is left out, and why:
#   * torch 2.11.0 / torchvision 0.26.0 / torchaudio 2.11.0: the image has them (+cu130 builds); vLLM 0.20.0–0.22.0
#     pin exactly these. Local stub wheels stand in for them during the resolve (their CUDA wheels pull
#     nvidia-nccl-cu13==2.28.9, which the index here does not serve, and we would not carry them anyway).
#   * every package of the image (device KINDS.md, 2026-11-17) except numpy / numba / llvmlite / setuptools:
#     vLLM pins numba==0.65.0 (→ llvmlite 0.47, numpy < 2.5; mistral-common wants numpy < 2.4) and
#     setuptools < 81, while the image has numpy 2.5.2, numba 0.68. Those travel and shadow the image's copies
#     (restore puts /tmp/vsite first on PYTHONPATH, for the vLLM processes only).
#     Image versions that vLLM's metadata constrains and that are known (transformers 5.17.0, tokenizers 0.23.2,
#     huggingface-hub 1.33.0, safetensors 0.8.0, sentencepiece 0.2.2, tiktoken 0.14.0, triton 3.6.0) are pinned as
#     constraints so the resolve proves they are accepted; restore runs a requirement check over the combined path.
#   * $LEAVE_OUT, 461 MB that a bf16 Llama on Hopper never loads (vllm 0.20.2's source, read; the bench ran without):
#       flashinfer-cubin 295 MB   prebuilt FlashInfer kernels; the FLASH_ATTN backend (FA3 on Hopper) and plain
#                                 temperature sampling (no top-k/top-p → no FlashInfer sampler) use none
#       nvidia-cutlass-dsl-libs-cu12 92 MB   CuTe-DSL runtime, imported only by vllm_flash_attn/cute (FA4, Blackwell)
#       tilelang 45 MB + z3-solver 29 MB     imported only by layers/mhc.py (DeepSeek-V4)
#     xgrammar (45 MB) must travel: it sits behind a LazyLoader, but XgrammarGrammar's dataclass annotations touch
#     it when vllm.v1.structured_output is imported, i.e. at every LLM() start (ModuleNotFoundError without it,
#     seen on the H200 2026-12-02).
# Parts are 58 MiB so that a part, the working tree (~4 MB) and SHA256SUMS stay under the 64 MiB of one call.
# Why pip's --dry-run report: pip evaluates environment markers with the interpreter that runs it (3.11 here), so
# `setuptools<81; python_version > "3.11"` is added by hand as a constraint.
set -euo pipefail
VLLM_VERSION="${VLLM_VERSION:-0.20.2}"
PART_MIB="${PART_MIB:-58}"
LEAVE_OUT="${LEAVE_OUT:-flashinfer-cubin nvidia-cutlass-dsl-libs-cu12 tilelang z3-solver}"
out=.device/vllm
work="${WORK:-$(mktemp -d)}"
rm -rf "$work/whl"; mkdir -p "$out" "$work/stubs" "$work/whl"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
t0=$(date +%s)

PLAT=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
  PLAT+=(--platform "${p}_x86_64")
done
PLAT+=(--platform any)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLAT[@]}" --only-binary=:all:)

# 1. stub wheels for the image's torch family (no dependencies): pip resolves vLLM's pins against them.
python3 - "$work/stubs" <<'EOF'
import sys, zipfile
for name, ver in [("torch", "2.11.0+cu130"), ("torchvision", "0.26.0+cu130"), ("torchaudio", "2.11.0+cu130")]:
    tag = "cp312-cp312-manylinux_2_39_x86_64"
    di = f"{name}-{ver}.dist-info"
    with zipfile.ZipFile(f"{sys.argv[1]}/{name}-{ver}-{tag}.whl", "w") as z:
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        z.writestr(f"{di}/WHEEL", f"Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: false\nTag: {tag}\n")
        z.writestr(f"{di}/RECORD", "")
EOF
cat > "$work/constraints.txt" <<'EOF'
torch==2.11.0+cu130
torchvision==0.26.0+cu130
torchaudio==2.11.0+cu130
transformers==5.17.0
tokenizers==0.23.2
huggingface-hub==1.33.0
safetensors==0.8.0
sentencepiece==0.2.2
tiktoken==0.14.0
triton==3.6.0
setuptools<81
EOF

# 2. resolve (metadata only) into a JSON report.
python3 -m pip install -q --dry-run --ignore-installed --target "$work/t" --report "$work/report.json" "${TARGET[@]}" \
  --find-links "$work/stubs" -c "$work/constraints.txt" "vllm==$VLLM_VERSION" "setuptools<81" 2>&1 \
  | grep -v '^WARNING: Location' || true
test -s "$work/report.json"

# 3. choose what travels.
python3 - "$work/report.json" "$LEAVE_OUT" > "$work/wanted.txt" <<'EOF'
import json, re, sys
def cn(n): return re.sub(r"[-_.]+", "-", n).lower()
image = {cn(x) for x in """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()}
travel = {"numpy", "numba", "llvmlite", "setuptools"}
leave = {cn(x) for x in sys.argv[2].split()}
for it in json.load(open(sys.argv[1]))["install"]:
    n, v = cn(it["metadata"]["name"]), it["metadata"]["version"]
    why = "leave-out" if n in leave else "image" if n in image and n not in travel else None
    print(f"{n}=={v}" if why is None else f"# {n}=={v}  ({why})")
EOF
grep -v '^#' "$work/wanted.txt" > "$work/req.txt"
echo "travels: $(wc -l < "$work/req.txt") wheels; left out: $(grep -c '^#' "$work/wanted.txt")"

# 4. download exactly those (no dependencies: the set is already closed).
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$work/whl" -r "$work/req.txt" 2>&1 | grep -v '^WARNING: Location' || true
n_whl=$(ls "$work/whl" | wc -l)
[ "$n_whl" -eq "$(wc -l < "$work/req.txt")" ] || { echo "expected $(wc -l < "$work/req.txt") wheels, got $n_whl" >&2; exit 1; }

# 5. one tar of every wheel (vllm first, so a short transfer fails loudly), cut into parts.
rm -f "$out"/part-* "$out"/cur
(cd "$work/whl" && ls -S) > "$work/order.txt"
tar cf - -C "$work/whl" -T "$work/order.txt" | split -b "${PART_MIB}M" -d -a 2 - "$out/part-"
(cd "$work/whl" && ls -l --block-size=1 | awk 'NR>1{print $5, $9}') > "$out/wheels.txt"
cp "$work/wanted.txt" "$out/resolved.txt"
echo "$LEAVE_OUT" > "$out/left_out.txt"
(cd "$out" && sha256sum part-* > SHA256SUMS)
echo "parts: $(ls "$out"/part-* | wc -l), $(du -cb "$out"/part-* | tail -1 | cut -f1) bytes; $(($(date +%s) - t0)) s"
ls -l "$out"
[ -n "${WORK:-}" ] || rm -rf "$work"

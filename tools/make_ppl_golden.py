"""Held-out perplexity of the trained model's variants, by edgebox and by llama.cpp (golden data).

    python tools/make_ppl_golden.py TRAIN_DIR      # the output folder of tools/train_tiny.py

Writes tests/data/heldout_sample.txt (the first 48 kB of the held-out standard-library files, the
text every figure below is measured on) and tests/data/golden/perplexity.json with, per variant,
llama.cpp's and edgebox's perplexity (llama.cpp's method, --ctx 256) and the untrained baseline.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgebox  # noqa: E402
from edgebox.commands.perplexity import llama_cpp_logits_of, perplexity  # noqa: E402

CTX = 256
SAMPLE_BYTES = 48_000


def main() -> None:
    train_dir = Path(sys.argv[1])
    record = json.loads((train_dir / "record.json").read_text())
    text = (train_dir / "heldout.txt").read_text()[:SAMPLE_BYTES]
    sample = REPO / "tests" / "data" / "heldout_sample.txt"
    sample.write_text(text)
    out = {
        "ctx": CTX,
        "sample": str(sample.relative_to(REPO)),
        "vocab": 32256,
        "untrained_heldout_ppl": math.exp(record["untrained_heldout_loss"]),
        "variants": {},
    }
    for variant in ("F16", "Q8_0", "Q4_K_M", "Q4_0"):
        path = train_dir / record["files"][variant]["name"]
        m = edgebox.load(path, n_ctx=CTX)
        tokens = m.tokenize(text)
        bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
        ours = perplexity(m.logits, tokens, CTX, bos)
        theirs = perplexity(llama_cpp_logits_of(str(path), CTX), tokens, CTX, bos)
        out["variants"][variant] = {
            "sha256": record["files"][variant]["sha256"],
            "edgebox": asdict(ours),
            "llama_cpp": asdict(theirs),
        }
        print(
            f"{variant}: edgebox {ours.ppl:.4f} +/- {ours.ppl_err:.4f}, llama.cpp {theirs.ppl:.4f} +/- {theirs.ppl_err:.4f}",
            flush=True,
        )
    (REPO / "tests" / "data" / "golden" / "perplexity.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

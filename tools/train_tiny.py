"""Train edgebox's small default model: DeepSeek-Coder architecture, real tokenizer, CPython stdlib.

    pip install torch==2.13.0          # the CPU wheel on this machine's disk; a tool dependency only
    python tools/train_tiny.py OUT_DIR [--minutes 25 | --steps N]

What it does, deterministically (fixed seed, fixed data order, fixed split):
1. Data: every ``.py`` file of this interpreter's standard library (``sysconfig``'s stdlib path,
   PSF licence), without ``site-packages``, ``test``/``tests`` packages and ``idlelib``. A file is
   held out when sha1 of its path relative to the stdlib ends in hex digit 0 (1/16 of the files,
   listed in the record). Files are tokenized with the DeepSeek-Coder tokenizer (edgebox's, from
   tests/data/vocab), each led by BOS, and concatenated.
2. Model: llama exactly as DeepSeek-Coder-6.7B defines it (RMSNorm, SwiGLU, no biases, rope base
   100000 with linear scaling x4, its 32256-token vocabulary and special tokens), scaled down:
   4 layers, width 256, 4 heads, FFN 768, tied embeddings: ~10.6 M parameters.
3. Training: AdamW, cosine schedule with warm-up, sequences of 256 tokens, batch 16, for the
   given wall-clock minutes on the CPU (2 threads; the schedule follows the clock, so a busy
   machine trains fewer steps rather than overrunning; ``--steps N`` replays a recorded run's
   schedule exactly, for bit-for-bit reproduction), then held-out loss.
4. Export: an F32 and an F16 GGUF through gguf-py's writer, Q/K rows permuted the way llama.cpp's
   converter does for the llama architecture (HF's rotate-half rope -> GGML's adjacent pairs),
   then Q8_0, Q4_0 and Q4_K_M through llama.cpp's own quantizer (llama-cpp-python).
5. Record: OUT_DIR/record.json with the held-out files, losses, timings and every file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures import tiny_models  # noqa: E402

SEED = 1234
N_EMBD, N_LAYER, N_HEAD, N_FF = 256, 4, 4, 768
ROPE_BASE, ROPE_LINEAR_FACTOR = 100000.0, 4.0
SEQ, BATCH = 256, 16
N_CTX = 4096


def stdlib_files() -> tuple[list[Path], list[Path], Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    held = [p for p in files if hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest()[-1] == "0"]
    held_set = set(held)
    return [p for p in files if p not in held_set], held, root


def tokenize_files(tok, files: list[Path]) -> np.ndarray:
    ids: list[int] = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        ids.extend(tok.encode(text, add_bos=True, parse_special=False))
    return np.array(ids, np.int64)


def cached_tokens(tok, files: list[Path], cache: Path) -> np.ndarray:
    """Token ids of ``files``, kept in OUT_DIR so a re-run skips the minutes of tokenizing."""
    if cache.exists():
        return np.load(cache)
    ids = tokenize_files(tok, files)
    np.save(cache, ids)
    return ids


def build_model(torch, n_vocab: int):
    nn = torch.nn
    hd = N_EMBD // N_HEAD

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(N_EMBD))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2).float() / hd))
    pos = torch.arange(N_CTX).float() / ROPE_LINEAR_FACTOR  # linear scaling: positions divided by 4
    angles = torch.outer(pos, inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([-x2, x1], -1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.ffn_norm = RMSNorm(), RMSNorm()
            self.q, self.k, self.v, self.o = (nn.Linear(N_EMBD, N_EMBD, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(N_EMBD, N_FF, bias=False), nn.Linear(N_EMBD, N_FF, bias=False)
            self.down = nn.Linear(N_FF, N_EMBD, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q = self.q(h).view(B, T, N_HEAD, hd).transpose(1, 2)
            k = self.k(h).view(B, T, N_HEAD, hd).transpose(1, 2)
            v = self.v(h).view(B, T, N_HEAD, hd).transpose(1, 2)
            c, s = cos[:T], sin[:T]
            q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(att.transpose(1, 2).reshape(B, T, N_EMBD))
            h = self.ffn_norm(x)
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(n_vocab, N_EMBD)
            self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
            self.norm = RMSNorm()
            nn.init.normal_(self.embed.weight, std=0.02)
            for b in self.blocks:
                for lin in (b.q, b.k, b.v, b.gate, b.up):
                    nn.init.normal_(lin.weight, std=0.02)
                for lin in (b.o, b.down):  # GPT-2's scaled init of residual projections
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * N_LAYER))

        def forward(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = b(x)
            return self.norm(x) @ self.embed.weight.T  # tied output

    return Tiny()


def batches(ids: np.ndarray, rng: np.random.RandomState):
    n = (len(ids) - 1) // SEQ
    while True:
        for start in rng.permutation(n)[: (n // BATCH) * BATCH].reshape(-1, BATCH):
            x = np.stack([ids[s * SEQ : (s + 1) * SEQ] for s in start])
            y = np.stack([ids[s * SEQ + 1 : (s + 1) * SEQ + 1] for s in start])
            yield x, y


def evaluate(torch, model, ids: np.ndarray, max_batches: int = 40) -> float:
    model.eval()
    n = (len(ids) - 1) // SEQ
    losses = []
    with torch.no_grad():
        for b in range(0, min(n, max_batches * BATCH), BATCH):
            idx = range(b, min(b + BATCH, n))
            x = torch.from_numpy(np.stack([ids[s * SEQ : (s + 1) * SEQ] for s in idx]))
            y = torch.from_numpy(np.stack([ids[s * SEQ + 1 : (s + 1) * SEQ + 1] for s in idx]))
            losses.append(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return float(np.mean(losses))


def permute_for_ggml(w: np.ndarray) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows: rotate-half pairs (i, i + hd/2) become
    adjacent pairs (2i, 2i + 1), which is what GGML's normal rope rotates."""
    hd = w.shape[0] // N_HEAD
    return w.reshape(N_HEAD, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def export(model, out: Path, ftype: str) -> Path:
    import gguf

    vocab = tiny_models.GGUFFile(tiny_models.vocab_path("deepseek-coder"))
    dtype = np.float32 if ftype == "F32" else np.float16
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("edgebox-tiny-coder")
    w.add_description(
        "edgebox default model: DeepSeek-Coder architecture (~10.6 M parameters) trained on the CPython "
        "standard library by tools/train_tiny.py"
    )
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(ROPE_LINEAR_FACTOR)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(vocab.fields["tokenizer.ggml.tokens"]))
    tiny_models._copy_vocab_metadata(w, vocab)
    w.add_chat_template((tiny_models.CHAT_TEMPLATES / "deepseek-coder-6.7b-instruct.jinja").read_text())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["embed.weight"].astype(dtype))
    for i in range(N_LAYER):
        p, b = f"blk.{i}.", f"blocks.{i}."
        w.add_tensor(p + "attn_norm.weight", sd[b + "attn_norm.weight"].astype(np.float32))
        w.add_tensor(p + "attn_q.weight", permute_for_ggml(sd[b + "q.weight"]).astype(dtype))
        w.add_tensor(p + "attn_k.weight", permute_for_ggml(sd[b + "k.weight"]).astype(dtype))
        w.add_tensor(p + "attn_v.weight", sd[b + "v.weight"].astype(dtype))
        w.add_tensor(p + "attn_output.weight", sd[b + "o.weight"].astype(dtype))
        w.add_tensor(p + "ffn_norm.weight", sd[b + "ffn_norm.weight"].astype(np.float32))
        w.add_tensor(p + "ffn_gate.weight", sd[b + "gate.weight"].astype(dtype))
        w.add_tensor(p + "ffn_up.weight", sd[b + "up.weight"].astype(dtype))
        w.add_tensor(p + "ffn_down.weight", sd[b + "down.weight"].astype(dtype))
    w.add_tensor("output_norm.weight", sd["norm.weight"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama.cpp failed to quantize {src.name} to {ftype}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description="train edgebox's tiny default model")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    ap.add_argument(
        "--steps", type=int, default=None, help="train exactly this many steps instead (the record's 'steps' reproduces a run)"
    )
    args = ap.parse_args()
    import torch

    from edgebox.gguf.file import read_fields
    from edgebox.text.tokenizer import Tokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    t_start = time.time()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_gguf_fields(read_fields(tiny_models.vocab_path("deepseek-coder")), "deepseek-coder")
    train_files, held_files, root = stdlib_files()
    train_ids, held_ids = (
        cached_tokens(tok, train_files, out / "train_ids.npy"),
        cached_tokens(tok, held_files, out / "heldout_ids.npy"),
    )
    (out / "heldout.txt").write_text("".join(p.read_text(encoding="utf-8", errors="replace") for p in held_files))
    print(
        f"data: {len(train_files)} train files ({len(train_ids)} tokens), {len(held_files)} held out ({len(held_ids)} tokens), "
        f"tokenized in {time.time() - t_start:.0f} s",
        flush=True,
    )

    model = build_model(torch, tok.n_vocab)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    untrained = evaluate(torch, model, held_ids, max_batches=4)
    budget_s, warmup = args.minutes * 60, 50
    data = batches(train_ids, np.random.RandomState(SEED))
    t0, step, losses = time.time(), 0, []
    # The schedule runs on the wall clock, not on a step count: the machine may be shared, and a
    # budget in minutes is what the recipe promises. lr: linear warm-up, then cosine to 2%.
    while True:
        elapsed = time.time() - t0
        progress = elapsed / budget_s if args.steps is None else step / args.steps
        if progress >= 1.0:
            break
        x, y = next(data)
        lr_scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = 3e-3 * max(lr_scale, 0.02)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)).flatten(0, 1), torch.from_numpy(y).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(
                f"step {step} loss {np.mean(losses[-25:]):.3f} lr {3e-3 * max(lr_scale, 0.02):.2e} "
                f"({elapsed:.0f}/{budget_s:.0f} s)",
                flush=True,
            )
    train_s = time.time() - t0
    held_loss = evaluate(torch, model, held_ids)
    print(
        f"held-out loss {held_loss:.3f} (ppl {math.exp(held_loss):.1f}); untrained {untrained:.3f} "
        f"(ppl {math.exp(untrained):.0f}); vocabulary {tok.n_vocab}",
        flush=True,
    )

    files = {"F32": export(model, out / "tiny-coder-F32.gguf", "F32"), "F16": export(model, out / "tiny-coder-F16.gguf", "F16")}
    for q in ("Q8_0", "Q4_0", "Q4_K_M"):
        files[q] = quantize(files["F32"], out / f"tiny-coder-{q}.gguf", q)
    record = {
        "seed": SEED,
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "torch": torch.__version__,
        "n_params": n_params,
        "steps": step,
        "tokens_seen": step * SEQ * BATCH,
        "train_seconds": round(train_s),
        "total_seconds": round(time.time() - t_start),
        "train_loss_last50": float(np.mean(losses[-50:])),
        "heldout_loss": held_loss,
        "untrained_heldout_loss": untrained,
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(held_ids)),
        "heldout_files": [str(p.relative_to(root)) for p in held_files],
        "files": {k: {"name": v.name, "sha256": tiny_models.sha256(v), "bytes": v.stat().st_size} for k, v in files.items()},
    }
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "heldout_files"}, indent=1))


if __name__ == "__main__":
    main()

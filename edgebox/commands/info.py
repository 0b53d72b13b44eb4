"""What ``edgebox info`` says about a model: facts read from the file, nothing computed by running it."""

from __future__ import annotations

from collections import Counter

from edgebox.api import Model


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(m: Model) -> list[tuple[str, str]]:
    a, f, tok = m.args, m.file, m.tokenizer
    n_params = sum(t.n_values for t in f.tensors.values())
    mix = Counter()
    for t in f.tensors.values():
        mix[getattr(t.qtype, "name", f"unknown type {t.qtype}")] += t.nbytes  # an unused tensor may have any type
    mix_text = ", ".join(f"{name} {100 * n / max(1, sum(mix.values())):.0f}%" for name, n in mix.most_common())
    rope = f"{'neox' if a.rope_neox else 'normal'}, base {a.rope_freq_base:g}"
    if a.rope_freq_scale != 1.0:
        rope += f", linear scaling x{1 / a.rope_freq_scale:g}"
    rows = [
        ("file", f"{m.path} ({_gib(f.file_size)}, GGUF v{f.version})"),
        ("name", str(f.fields.get("general.name", "?"))),
        ("architecture", a.arch),
        ("parameters", f"{n_params / 1e9:.2f} B" if n_params >= 1e8 else f"{n_params / 1e6:.1f} M"),
        ("tensor types", f"{mix_text} (share of weight bytes)"),
        ("layers", f"{a.n_layer} x (width {a.n_embd}, {a.n_head} heads, {a.n_head_kv} KV heads, FFN {a.n_ff})"),
        ("context", f"{a.n_ctx_train} trained, {m.n_ctx} used"),
        ("rope", rope),
        ("embeddings", "tied (output = token_embd)" if m.weights.tied_embeddings else "separate output matrix"),
        (
            "tokenizer",
            f"{f.fields.get('tokenizer.ggml.model')} / {f.fields.get('tokenizer.ggml.pre')}, {tok.n_vocab} tokens, BOS {'added' if tok.add_bos else 'not added'}",
        ),
        ("chat template", "yes" if m.chat_template else "no"),
    ]
    description = f.fields.get("general.description")
    if isinstance(description, str):
        rows.append(("note", description))
    return rows

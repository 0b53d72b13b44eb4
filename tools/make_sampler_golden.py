"""Write tests/data/sampler/: what llama.cpp's samplers make of fixed logits and histories.

Each case feeds one row of logits (float32, 1000-32256 tokens; some with tied values, some very
peaked) and a history to llama.cpp's sampler chain as ``common/sampling.cpp`` builds it from the
same parameters (logit_bias, then the ``samplers`` in order, then ``dist``; with mirostat:
temperature, then mirostat), through llama-cpp-python's ``llama_sampler_*`` API, and records the
candidates left (id, probability after llama.cpp's softmax in ``dist``). DRY gets the
DeepSeek-Coder vocabulary (vocab-only GGUF); the tests build edgebox's tokenizer from the same file.

Random parts are recorded as llama.cpp's own statistics: draw counts of ``dist`` and of
mirostat v2's first pick, how often XTC fires at 0 < p < 1, and mirostat's ``mu`` after each step
of a trajectory (read from the sampler's state; the layout is checked against tau and m).

Needs llama-cpp-python (``pip install -e .[oracle]``); the tests only read the data.

    python tools/make_sampler_golden.py
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from pathlib import Path

import llama_cpp as L
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from edgebox.text.sampler import SamplingParams  # noqa: E402  (defaults and validation only)

OUT = REPO / "tests" / "data" / "sampler"
VOCAB = REPO / "tests" / "data" / "vocab" / "ggml-vocab-deepseek-coder.gguf"
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(L.llama_token_data)


def make_rows(n_vocab_dry: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261203)
    rows = {
        "normal2k": rng.standard_normal(2000) * 2.0,
        "normal8k": rng.standard_normal(8000) * 3.0,
        "wide2k": rng.standard_normal(2000) * 5.0,
        "flat4k": rng.standard_normal(4000) * 0.5,
        "peaked4k": rng.standard_normal(4000),
        "ties3k": np.round(rng.standard_normal(3000) * 2.0, 3),
        "head2k": rng.standard_normal(2000),
        "dry_a": rng.standard_normal(n_vocab_dry),
        "dry_b": rng.standard_normal(n_vocab_dry) * 2.0,
    }
    rows["peaked4k"][1234] = 25.0  # one token holds nearly all the mass
    t = rows["ties3k"]
    t[[10, 20, 30]] = t.max() + 1.0  # three tied best tokens, inside every cut below
    t[[40, 41, 42, 43]] = t.max() - 0.25  # and four tied right after them
    rows["head2k"][[1, 2, 3, 4, 5]] = [8.0, 7.6, 7.3, 7.0, 6.0]  # several tokens above XTC's thresholds
    return {k: v.astype(np.float32) for k, v in rows.items()}


class Chain:
    """A llama.cpp sampler chain built as common_sampler_init builds it from ``kw``."""

    def __init__(self, kw: dict, n_vocab: int, vocab, eog_ids: list[int], history: list[int], seed: int = 1234):
        p = SamplingParams(**{**kw, "logit_bias": {int(t): b for t, b in kw.get("logit_bias", [])}})
        self.chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._keep = []  # ctypes buffers the samplers point into
        bias = [*p.logit_bias, *((t, -math.inf) for t in eog_ids if p.ignore_eos)]
        if bias:
            arr = (L.llama_logit_bias * len(bias))(*[L.llama_logit_bias(t, b) for t, b in bias])
            self._keep.append(arr)
            self._add(L.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        whole = len(history) + 1  # common turns -1 ("context size") into n_ctx
        if p.mirostat == 0:
            for name in p.samplers:
                self._add(self._one(name, p, n_vocab, vocab, whole, seed))
            self._add(L.llama_sampler_init_dist(seed))
        elif p.mirostat == 1:
            self._add(L.llama_sampler_init_temp(p.temperature))
            self._add(L.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
        else:
            self._add(L.llama_sampler_init_temp(p.temperature))
            self._add(L.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta))
        for t in history:
            L.llama_sampler_accept(self.chain, int(t))

    def _add(self, smpl) -> None:
        L.llama_sampler_chain_add(self.chain, smpl)

    def _one(self, name: str, p: SamplingParams, n_vocab: int, vocab, whole: int, seed: int):
        if name == "penalties":
            last_n = whole if p.repeat_last_n < 0 else p.repeat_last_n
            return L.llama_sampler_init_penalties(n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if name == "dry":
            breakers = [b.encode() for b in p.dry_sequence_breakers]
            arr = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
            self._keep.append(arr)
            last_n = whole if p.dry_penalty_last_n < 0 else p.dry_penalty_last_n
            return L.llama_sampler_init_dry(vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n, arr, len(breakers))
        if name == "top_n_sigma":
            return L.llama_sampler_init_top_n_sigma(p.top_n_sigma)
        if name == "top_k":
            return L.llama_sampler_init_top_k(p.top_k)
        if name == "typ_p":
            return L.llama_sampler_init_typical(p.typical_p, 0)
        if name == "top_p":
            return L.llama_sampler_init_top_p(p.top_p, 0)
        if name == "min_p":
            return L.llama_sampler_init_min_p(p.min_p, 0)
        if name == "xtc":
            return L.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, 0, seed)
        assert name == "temperature"
        return L.llama_sampler_init_temp_ext(p.temperature, 0.0, 1.0)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The candidates the chain leaves (XTC moves the array's start) and the selected index."""
        buf = np.zeros(logits.size, _TOKEN_DATA)
        buf["id"] = np.arange(logits.size)
        buf["logit"] = logits
        data = ctypes.cast(buf.ctypes.data, ctypes.POINTER(L.llama_token_data))
        arr = L.llama_token_data_array(data=data, size=logits.size, selected=-1, sorted=False)
        L.llama_sampler_apply(self.chain, ctypes.byref(arr))
        start = (ctypes.cast(arr.data, ctypes.c_void_p).value - buf.ctypes.data) // _TOKEN_DATA.itemsize
        out = buf[start : start + arr.size].copy()
        self.selected = int(out["id"][arr.selected])
        return out

    def accept(self, token: int) -> None:
        L.llama_sampler_accept(self.chain, token)

    def mu(self, tau: float, version: int) -> float:
        """mirostat's mu, read from the sampler's state (the last in the chain)."""
        smpl = L.llama_sampler_chain_get(self.chain, L.llama_sampler_chain_n(self.chain) - 1)
        ctx = smpl.contents.ctx
        floats = (ctypes.c_float * 7).from_address(ctx)
        if version == 2:  # {uint32 seed, seed_cur; float tau, eta, mu; mt19937 rng}
            assert math.isclose(floats[2], tau, rel_tol=1e-6), "mirostat v2 layout changed"
            return float(floats[4])
        ints = (ctypes.c_int32 * 7).from_address(ctx)  # {int32 n_vocab; uint32 seed, seed_cur; float tau, eta; int32 m; float mu}
        assert math.isclose(floats[3], tau, rel_tol=1e-6) and ints[5] == 100, "mirostat layout changed"
        return float(floats[6])

    def __del__(self):
        L.llama_sampler_free(self.chain)


def main() -> None:
    quiet = L.llama_log_callback(lambda *a: None)
    L.llama_log_set(quiet, ctypes.c_void_p())
    mparams = L.llama_model_default_params()
    mparams.vocab_only = True
    model = L.llama_model_load_from_file(str(VOCAB).encode(), mparams)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    eog_ids = [t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t)]

    def tokenize(text: str) -> list[int]:
        buf = (L.llama_token * 4096)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 4096, False, False)
        return list(buf[:n])

    rows = make_rows(n_vocab)
    rng = np.random.default_rng(7)
    repeats = [int(t) for t in rng.integers(0, 50, 40)]  # low ids: they recur
    histories = {
        "none": [],
        "repeats": repeats + [int(t) for t in rng.integers(0, 2000, 40)],
        "short": [3, 3, 3, 7, 11, 7],
        "story": tokenize("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy"),
        "fields": tokenize("name: Alice\nage: 30\nname: Bob\nage: 31\nname: Alice\nage: 30\nname: Alice\nage"),
        "code": tokenize("for i in range(10):\n    total += i * i\nfor i in range(10):\n    total += i * i\nfor i in range"),
        "quote": tokenize('He said "hello there my friend" and then "hello there my friend" and "hello there my'),
    }
    # the DRY rows favour what the histories hold, so the penalties move real mass
    seen = sorted({t for h in ("story", "fields", "code", "quote") for t in histories[h]})
    for name in ("dry_a", "dry_b"):
        rows[name][seen] = (6.0 + rng.standard_normal(len(seen))).astype(np.float32)

    cases: list[tuple[str, str, str, dict]] = []

    def case(name: str, row: str, history: str, **kw) -> None:
        cases.append((name, row, history, kw))

    alone = dict(samplers=[])
    # each sampler alone
    for row in ("normal2k", "ties3k", "peaked4k"):
        case(f"logit_bias/{row}", row, "none", **alone, logit_bias=[[5, 3.0], [17, -math.inf], [100, -2.5], [1999, 10.0]])
        case(f"ignore_eos/{row}", row, "none", **alone, ignore_eos=True)
    for row in ("normal2k", "wide2k", "normal8k"):
        case(
            f"penalties/{row}",
            row,
            "repeats",
            samplers=["penalties"],
            repeat_penalty=1.3,
            frequency_penalty=0.4,
            presence_penalty=0.6,
            repeat_last_n=32,
        )
        case(
            f"penalties-whole/{row}",
            row,
            "repeats",
            samplers=["penalties"],
            repeat_penalty=0.9,
            frequency_penalty=-0.2,
            repeat_last_n=-1,
        )
        case(f"presence/{row}", row, "short", samplers=["penalties"], presence_penalty=1.5)
        case(f"frequency/{row}", row, "short", samplers=["penalties"], frequency_penalty=0.7)
    for row in ("normal2k", "ties3k", "peaked4k", "normal8k"):
        for k in (1, 10, 40, 500):
            case(f"top_k={k}/{row}", row, "none", samplers=["top_k"], top_k=k)
        for p in (0.5, 0.9, 0.95):
            case(f"top_p={p}/{row}", row, "none", samplers=["top_p"], top_p=p)
        for p in (0.05, 0.2):
            case(f"min_p={p}/{row}", row, "none", samplers=["min_p"], min_p=p)
        for p in (0.5, 0.9, 0.95):
            case(f"typ_p={p}/{row}", row, "none", samplers=["typ_p"], typical_p=p)
        for n in (1.0, 2.5):
            case(f"top_n_sigma={n}/{row}", row, "none", samplers=["top_n_sigma"], top_n_sigma=n)
        for t in (0.0, 0.5, 1.7):
            case(f"temperature={t}/{row}", row, "none", samplers=["temperature"], temperature=t)
    for row in ("head2k", "normal2k"):
        for t in (0.05, 0.1, 0.2):
            case(f"xtc=1,{t}/{row}", row, "none", samplers=["xtc"], xtc_probability=1.0, xtc_threshold=t)
        case(f"xtc=0/{row}", row, "none", samplers=["xtc"], xtc_probability=0.0)
    # DRY, then top-k to keep the data small (the histories' tokens sit high in the DRY rows)
    dry = dict(samplers=["dry", "top_k"], top_k=300, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    case("dry-alone/dry_a/fields", "dry_a", "fields", **{**dry, "samplers": ["dry"]})
    for row in ("dry_a", "dry_b"):
        for h in ("story", "fields", "code", "quote"):
            case(f"dry/{row}/{h}", row, h, **dry)
            case(f"dry-whole/{row}/{h}", row, h, **{**dry, "dry_penalty_last_n": -1, "dry_allowed_length": 1, "dry_base": 2.0})
            case(
                f"dry-breakers/{row}/{h}",
                row,
                h,
                **{**dry, "dry_sequence_breakers": ["my friend", " jumps over", "\n    ", "age:", "(10)"]},
            )
        case(f"dry-short-window/{row}", row, "code", **{**dry, "dry_penalty_last_n": 8})
        case(f"dry-no-breakers/{row}", row, "fields", **{**dry, "dry_sequence_breakers": []})
    # chains: llama.cpp's default, everything on, other orders
    for row in ("normal2k", "ties3k", "peaked4k", "normal8k", "wide2k"):
        case(f"default/{row}", row, "repeats")
        case(f"default-penalized/{row}", row, "repeats", repeat_penalty=1.1, presence_penalty=0.3)
        case(f"greedy/{row}", row, "repeats", temperature=0.0, repeat_penalty=1.2)
        case(
            f"all-on/{row}",
            row,
            "repeats",
            repeat_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.2,
            top_n_sigma=3.0,
            top_k=100,
            typical_p=0.9,
            top_p=0.9,
            min_p=0.02,
            xtc_probability=1.0,
            xtc_threshold=0.1,
            temperature=0.7,
            logit_bias=[[7, 1.5], [8, -math.inf]],
        )
        case(f"temp-first/{row}", row, "none", samplers=["temperature", "top_p", "min_p"], temperature=1.5, top_p=0.8, min_p=0.1)
        case(f"min_p-first/{row}", row, "none", samplers=["min_p", "top_k", "temperature"], min_p=0.01, top_k=20, temperature=0.6)
        case(
            f"typ-greedy/{row}", row, "none", samplers=["top_k", "typ_p", "temperature"], top_k=50, typical_p=0.5, temperature=0.0
        )
        case(f"no-top_k/{row}", row, "none", top_k=0, top_p=0.9, min_p=0.0)
    for row in ("dry_a", "dry_b"):
        case(
            f"all-on-dry/{row}",
            row,
            "fields",
            repeat_penalty=1.1,
            frequency_penalty=0.1,
            presence_penalty=0.1,
            dry_multiplier=0.8,
            top_n_sigma=3.0,
            top_k=30,  # fewer than top-n-sigma leaves: see the note on typical in edgebox/text/sampler.py
            typical_p=0.95,
            top_p=0.95,
            min_p=0.01,
            xtc_probability=1.0,
            xtc_threshold=0.05,
            temperature=0.9,
        )
        case(f"default-dry/{row}", row, "code", dry_multiplier=0.8)

    arrays: dict[str, np.ndarray] = {f"row/{k}": v for k, v in rows.items()}
    meta = {"n_vocab": n_vocab, "eog_ids": eog_ids, "histories": histories, "cases": []}
    for i, (name, row, history, kw) in enumerate(cases):
        n = rows[row].size
        chain = Chain(kw, n, vocab, eog_ids if n == n_vocab else [t for t in eog_ids if t < n], histories[history])
        out = chain.apply(rows[row])
        out = out[out["logit"] > -np.inf]  # llama.cpp leaves banned / greedy-dropped tokens at -inf
        arrays[f"case{i}/id"] = out["id"].astype(np.uint16)  # every vocabulary here is < 65536
        arrays[f"case{i}/p"] = out["p"]
        meta["cases"].append({"name": name, "row": row, "history": history, "params": kw})

    # mirostat: trajectories of mu given llama.cpp's own picks
    steps = np.random.default_rng(11).standard_normal((40, 1000)).astype(np.float32) * 2.0
    arrays["mirostat/logits"] = steps
    meta["mirostat"] = []
    for version, kw in (
        (2, dict(mirostat=2)),
        (2, dict(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.3, temperature=1.2)),
        (1, dict(mirostat=1, mirostat_tau=4.0, mirostat_eta=0.2)),
    ):
        p = SamplingParams(**kw)
        chain = Chain(kw, 1000, vocab, [], [], seed=99)
        picks, mus = [], []
        for s, row in enumerate(steps):
            out = chain.apply(row)
            j = len(meta["mirostat"])
            arrays[f"mirostat{j}/step{s}/id"] = out["id"].astype(np.uint16)
            arrays[f"mirostat{j}/step{s}/p"] = out["p"]
            picks.append(chain.selected)
            chain.accept(chain.selected)
            mus.append(chain.mu(p.mirostat_tau, version))
        meta["mirostat"].append({"params": kw, "picks": picks, "mu": mus})

    # random draws: llama.cpp's counts
    draws = {}
    kw = dict(samplers=["top_k", "temperature"], top_k=6, temperature=1.0)
    chain = Chain(kw, 2000, vocab, [], [], seed=5)
    counts: dict[int, int] = {}
    for _ in range(20000):
        chain.apply(rows["normal2k"])
        counts[chain.selected] = counts.get(chain.selected, 0) + 1
    draws["dist"] = {"row": "normal2k", "params": kw, "counts": counts}
    kw = dict(samplers=["xtc"], xtc_probability=0.3, xtc_threshold=0.1)
    chain = Chain(kw, 2000, vocab, [], [], seed=6)
    fired = sum(chain.apply(rows["head2k"]).size < 2000 for _ in range(4000))
    draws["xtc"] = {"row": "head2k", "params": kw, "calls": 4000, "fired": int(fired)}
    kw = dict(mirostat=2, mirostat_tau=2.0)
    counts = {}
    for seed in range(4000):
        chain = Chain(kw, 2000, vocab, [], [], seed=seed)
        chain.apply(rows["head2k"])
        counts[chain.selected] = counts.get(chain.selected, 0) + 1
    draws["mirostat2"] = {"row": "head2k", "params": kw, "counts": counts}
    meta["draws"] = draws

    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "llama_cpp.npz", **arrays)
    (OUT / "llama_cpp.json").write_text(json.dumps(meta, indent=1) + "\n")
    L.llama_model_free(model)
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"{len(cases)} cases, 3 mirostat trajectories, 3 draw statistics -> {OUT} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

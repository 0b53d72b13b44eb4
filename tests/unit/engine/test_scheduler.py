"""The scheduler on its own: a step plan computed from a state it does not change."""

from __future__ import annotations

from edgebox.engine.queued import Queued, reservation
from edgebox.engine.request import Handle, Request
from edgebox.engine.scheduler import schedule, steps_until_start
from edgebox.engine.sequence import Sequence, context_shift
from edgebox.gguf.args import LlamaArgs
from edgebox.model.kv_cache import KVCache

ARGS = LlamaArgs(
    n_vocab=32,
    n_embd=8,
    n_layer=1,
    n_head=1,
    n_head_kv=1,
    n_ff=8,
    n_ctx_train=64,
    n_rot=8,
    rope_freq_base=10000.0,
    rope_freq_scale=1.0,
    rms_eps=1e-6,
)
N_CTX = 64
PER_TOKEN = KVCache(ARGS, 1).nbytes


class Tok:
    eog_ids = frozenset({0})

    def stream_decoder(self):
        return None


def queued(ids, max_tokens=8, **kw) -> Queued:
    r = Request(prompt="p", max_tokens=max_tokens, **kw)
    return Queued(Handle(r, None), list(ids), reservation(r, len(ids), N_CTX), False, 0)


def running(ids, done, pending=None, max_tokens=8, **kw) -> Sequence:
    q = queued(ids, max_tokens, **kw)
    kv = KVCache(ARGS, q.reserved)
    kv.length = done
    s = Sequence(q, kv, Tok())
    s.n_done, s.pending = min(done, len(ids)), pending
    return s


def plan(run, queue, cache=(), limit=4, chunk=16, budget_tokens=1000):
    return schedule(
        run,
        queue,
        list(cache),
        batch_limit=limit,
        prefill_chunk=chunk,
        kv_budget_bytes=budget_tokens * PER_TOKEN,
        kv_bytes_per_token=PER_TOKEN,
    )


def test_decode_rows_first_then_prompt_chunks_sharing_the_chunk_oldest_first():
    a = running(range(10), 12, pending=3)  # decoding at context 12
    b = running(range(30), 8)  # reading its prompt: 22 left
    c = running(range(20), 0)  # reading its prompt: 20 left
    p = plan([a, b, c], [queued(range(5))], chunk=16)
    assert p.decode == (a,) and p.prefill == ((b, 16),)
    assert p.cost == ((1, 13), (16, 24)) and p.n_logits == 2
    assert len(p.admitted) == 1 and p.admitted[0].rows == 0  # joins, reads its prompt next step


def test_admission_is_fifo_within_the_batch_limit_and_the_kv_budget():
    q1, q2, q3 = queued(range(4), max_tokens=20), queued(range(4), max_tokens=60), queued(range(2))
    p = plan([], [q1, q2, q3], budget_tokens=70)  # q2 (64 slots) does not fit after q1 (24): q3 waits too
    assert [a.queued for a in p.admitted] == [q1] and p.cost == ((4, 4),)
    p = plan([], [q1, q2, q3], limit=1)
    assert [a.queued for a in p.admitted] == [q1]


def test_cancelled_requests_leave_and_cached_prompts_make_room():
    q1, q2 = queued(range(4)), queued(range(40, 46))
    q1.handle.cancel()
    old = KVCache(ARGS, 30)
    old.length = 20
    cache = [(list(range(40, 60)), old)]
    p = plan([], [q1, q2], cache, budget_tokens=30 + 13)  # q2 (14 slots) fits only if the cache goes
    assert p.dropped == (q1,) and p.evicted == 1 and p.admitted[0].prefix_from is None
    p = plan([], [q1, q2], cache)  # room for both: q2 reuses 5 cached tokens
    assert p.evicted == 0 and p.admitted[0].prefix_from is old and p.admitted[0].cached == 5
    assert p.cost == ((1, 6),)
    s = running(range(10), 12, pending=1)
    s.handle.cancel()
    p = plan([s], [])
    assert p.cancelled == (s,) and p.decode == () and p.cost == ()


def test_a_full_context_shifts_before_its_decode_row():
    s = running(range(10), N_CTX, pending=1, context_shift=True, n_keep=4)
    p = plan([s], [])
    assert p.shift == (s,) and p.cost == ((1, N_CTX - context_shift(N_CTX, 4)[1] + 1),)


def test_the_plan_changes_nothing():
    a = running(range(10), 12, pending=3)
    b = running(range(30), 8)
    q = queued(range(5))
    cache = [(list(range(5)), KVCache(ARGS, 8))]
    before = (a.kv.length, a.n_done, b.kv.length, b.n_done, len(cache), q.handle.done)
    first = plan([a, b], [q], cache, budget_tokens=80)
    assert (a.kv.length, a.n_done, b.kv.length, b.n_done, len(cache), q.handle.done) == before
    assert plan([a, b], [q], cache, budget_tokens=80) == first


# -- priorities and deadlines -------------------------------------------------------------------


def test_interactive_requests_are_admitted_before_earlier_batch_ones():
    b1, b2 = queued(range(4), priority="batch"), queued(range(4), priority="batch")
    i1 = queued(range(4))
    p = plan([], [b1, b2, i1], limit=2)
    assert [a.queued for a in p.admitted] == [i1, b1]


def test_an_interactive_request_pauses_the_newest_batch_sequence_for_a_slot():
    old = running(range(4), 6, pending=1, priority="batch")
    new = running(range(4), 6, pending=1, priority="batch")
    chat = running(range(4), 6, pending=1)
    i1 = queued(range(5))
    p = plan([old, new, chat], [i1], limit=3)
    assert p.paused == (new,) and [a.queued for a in p.admitted] == [i1]
    assert p.decode == (old, chat)  # the paused one skips the step; it keeps its KV cache
    # a batch request never pauses anyone
    p = plan([old, new, chat], [queued(range(5), priority="batch")], limit=3)
    assert p.paused == () and p.admitted == ()


def test_paused_sequences_resume_before_queued_batch_work_once_a_slot_frees():
    paused = running(range(4), 6, pending=1, priority="batch")
    paused.paused = True
    other = running(range(4), 6, pending=1, priority="batch")
    waiting = queued(range(5), priority="batch")
    p = plan([paused, other], [waiting], limit=2)
    assert p.resumed == (paused,) and p.admitted == () and p.decode == (other, paused)
    p = plan([paused, other], [waiting, queued(range(3))], limit=2)  # an interactive request still comes first
    assert p.resumed == () and len(p.admitted) == 1 and p.admitted[0].queued.rank == 0


def test_interactive_prompts_are_read_first():
    batch = running(range(40), 0, priority="batch")  # reading a long prompt
    chat = queued(range(10))
    p = plan([batch], [chat], chunk=16)
    assert p.admitted[0].rows == 10 and p.prefill == ((batch, 6),)


def test_a_queued_request_past_its_deadline_leaves():
    busy = running(range(4), 6, pending=1)
    late, fine = queued(range(4), deadline_s=0.5), queued(range(4), deadline_s=5.0)
    late.t_submit = fine.t_submit = 10.0
    p = schedule(
        [busy],
        [late, fine],
        [],
        batch_limit=1,
        prefill_chunk=16,
        kv_budget_bytes=1000 * PER_TOKEN,
        kv_bytes_per_token=PER_TOKEN,
        now=11.0,
    )
    assert p.expired == (late,) and p.admitted == ()


def test_steps_until_start_follow_the_slots_in_admission_order():
    a = running(range(4), 6, pending=1, max_tokens=10)  # 10 tokens left
    b = running(range(4), 6, pending=1, max_tokens=30, priority="batch")  # 30 left
    kw = dict(batch_limit=2, prefill_chunk=16)
    assert steps_until_start([a], [], 0, **kw) == 0  # a free slot
    assert steps_until_start([a, b], [], 1, **kw) == 10  # a batch request waits for a to end
    assert steps_until_start([a, b], [], 0, **kw) == 0  # an interactive one pauses b
    ahead = queued(range(20), max_tokens=8)  # 2 prompt chunks + 8 tokens, in the first slot to free
    assert steps_until_start([a, b], [ahead], 1, **kw) == 20  # b's slot (30) vs a's + ahead (10 + 10)
    assert steps_until_start([a, b], [ahead, ahead], 1, **kw) == 30

# The next-token choice after a decoder call: logit filters, log-softmax, top k or a sample.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import exp, log
from std.utils.numerics import neg_inf

from .simd import F32, V, exp_sum, range_max


comptime RULES = 9  # per row: four banned ranges [lo, hi), then timestamp_begin (0: no timestamp rule)


def _fill(s: UnsafePointer[Float32, MutUntrackedOrigin], lo: Int, hi: Int, v: Float32):
    """s[lo:hi] = v, V lanes at a time (the timestamp rule bans ~50k text tokens at once)."""
    var i = lo
    while i + V <= hi:
        s.unsafe_store(i, SIMD[F32, V](v))
        i += V
    while i < hi:
        s.unsafe_store(i, v)
        i += 1


def _log_sum_exp(s: UnsafePointer[Float32, MutUntrackedOrigin], lo: Int, hi: Int, m: Float32, lse: Float32, top: Float32) -> Float32:
    """log(sum(exp(((s[lo:hi] - m) - lse) - top))) (simd.exp_sum): with lse = top = 0 the log of
    softmax's sum (subtracting 0 is exact); with the log-probabilities' lse and their max `top`,
    logsumexp of those log-probabilities less `top`."""
    return log(exp_sum[False, True](s, lo, hi, m, lse, top))


@always_inline
def _insert(idx: UnsafePointer[Int, MutUntrackedOrigin], val: UnsafePointer[Float32, MutUntrackedOrigin], count: Int, k: Int, i: Int, v: Float32) -> Int:
    """Token i of value v into the list idx/val (count <= k entries, largest first; an equal
    value goes after those already there); the new count."""
    if count == k and not (v > val.unsafe_load(k - 1)):
        return count
    var pos = count if count < k else k - 1
    while pos > 0 and val.unsafe_load(pos - 1) < v:
        idx.unsafe_store(pos, idx.unsafe_load(pos - 1))
        val.unsafe_store(pos, val.unsafe_load(pos - 1))
        pos -= 1
    idx.unsafe_store(pos, i)
    val.unsafe_store(pos, v)
    return min(count + 1, k)


def _select_row[o: MutOrigin](
    dst: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], s: UnsafePointer[Float32, MutUntrackedOrigin],
    rule: UnsafePointer[Int32, _], suppress: UnsafePointer[Int32, _], n_suppress: Int, temperature: Float32, u: Float32,
    idx: UnsafePointer[Int, MutUntrackedOrigin], val: UnsafePointer[Float32, MutUntrackedOrigin], n: Int, k: Int,
):
    """One row of SelectTokens: x (n) logits -> dst (k, 2) (token, log-probability) pairs."""
    var ninf = neg_inf[F32]()
    var n16 = n - n % V
    var finite = SIMD[F32, V](0)  # stays 0 unless a logit is NaN or infinite
    for i in range(0, n16, V):
        var v = x.unsafe_load[width=V](i)
        finite += v * 0
        s.unsafe_store(i, v)
    var finite_tail = Float32(0)
    for i in range(n16, n):
        finite_tail += x.unsafe_load(i) * 0
        s.unsafe_store(i, x.unsafe_load(i))
    var bad = finite.reduce_add() + finite_tail
    for j in range(4):
        var lo = max(0, min(n, Int(rule.unsafe_load(2 * j))))
        var hi = max(0, min(n, Int(rule.unsafe_load(2 * j + 1))))
        _fill(s, lo, hi, ninf)
    for j in range(n_suppress):
        s.unsafe_store(Int(suppress.unsafe_load(j)), ninf)
    var tb = Int(rule.unsafe_load(2 * 4))
    if tb <= 0 or tb >= n:
        tb = 0
    # log_softmax(s) = (s - m) - lse: m the max, lse = log(sum(exp(s - m)))
    var text_max = range_max(s, 0, tb)
    var ts_max = range_max(s, tb, n)
    var m = max(text_max, ts_max)
    var lse = _log_sum_exp(s, 0, n, m, 0, 0) + bad  # NaN (so every log-probability is) when a logit is not finite
    if tb > 0:
        # openai-whisper's ApplyTimestampRules, last: if the timestamps' probabilities together
        # (logsumexp of their log-probabilities) outweigh the most likely text token, text is banned
        var ts_top = (ts_max - m) - lse
        var ts = ts_top
        if ts_top > ninf:
            ts = ts_top + _log_sum_exp(s, tb, n, m, lse, ts_top)
        if ts > (text_max - m) - lse:
            _fill(s, 0, tb, ninf)
            m = ts_max
            lse = _log_sum_exp(s, 0, n, m, 0, 0) + bad
    if temperature > 0:
        # a sample of softmax(logits / temperature): the first token whose running sum of
        # probabilities passes u * total (float64 sums, in token order)
        var top = m / temperature
        var total = Float64(0)
        for i in range(n):
            total += Float64(exp(s.unsafe_load(i) / temperature - top))
        var target = Float64(u) * total
        var run = Float64(0)
        var pick = -1
        for i in range(n):
            var p = Float64(exp(s.unsafe_load(i) / temperature - top))
            if p > 0:
                pick = i  # the last token with a probability, if rounding leaves the sum short
                run += p
                if run > target:
                    break
        dst.unsafe_store(0, Float32(pick))
        dst.unsafe_store(1, (s.unsafe_load(max(pick, 0)) - m) - lse if pick >= 0 else ninf)
        for j in range(1, k):
            dst.unsafe_store(2 * j, Float32(-1))
            dst.unsafe_store(2 * j + 1, ninf)
        return
    # the k largest, largest first, ties to the lower token: a stable sort's first k. A block of
    # 16 is looked at one by one only when one of them would enter the list
    var count = 0
    for c in range(0, n16, V):
        if count < k or s.unsafe_load[width=V](c).reduce_max() > val.unsafe_load(k - 1):
            for i in range(c, c + V):
                count = _insert(idx, val, count, k, i, s.unsafe_load(i))
    for i in range(n16, n):
        count = _insert(idx, val, count, k, i, s.unsafe_load(i))
    for j in range(k):
        var t = idx.unsafe_load(j)
        dst.unsafe_store(2 * j, Float32(t))
        dst.unsafe_store(2 * j + 1, (s.unsafe_load(t) - m) - lse)


@extensibility.register("whisper_max.select_tokens")
struct SelectTokens:
    """The next-token choice of openai-whisper's decoding, per row of logits (rows, n), so that a
    step hands back k (token, log-probability) pairs per row instead of n logits.

    The logits are filtered as openai-whisper's logit filters leave them: every token in
    `suppress` (SuppressTokens, no-timestamps) and, per row, four token ranges [lo, hi) in
    `rules` (rows, 9) (SuppressBlank at the first sampled position; ApplyTimestampRules' pairing,
    monotonic and initial-timestamp rules, which the caller works out from the row's tokens) are
    set to -inf; then, when rules[r, 8] (timestamp_begin) is > 0, text is banned too if the
    timestamps' summed probability outweighs any text token's. The log-probabilities are
    log_softmax of what is left ((x - max) - log(sum(exp(x - max))), float32).

    `sampling` (rows, 2) is (temperature, u) per row. Temperature 0: choice (rows, k, 2) holds the
    k highest-scoring tokens, best first, ties to the lower token (slot 0 is the greedy
    choice, the argmax of the filtered logits; beam search takes the k). Temperature > 0: slot
    0 is a sample of softmax(logits / temperature) drawn with u in [0, 1); the other slots are
    (-1, -inf). Tokens are stored as float32 (exact below 2^24). A logit that is NaN or infinite
    makes the row's log-probabilities NaN, which the caller reports."""

    @staticmethod
    def execute[target: StaticString](
        choice: OutputTensor[dtype=DType.float32, rank=3, ...],
        logits: InputTensor[dtype=DType.float32, rank=2, ...],
        rules: InputTensor[dtype=DType.int32, rank=2, ...],
        suppress: InputTensor[dtype=DType.int32, rank=1, ...],
        sampling: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = logits.dim_size(0)
        var n = logits.dim_size(1)
        var k = choice.dim_size(1)
        var n_suppress = suppress.dim_size(0)
        if choice.dim_size(0) != rows or choice.dim_size(2) != 2 or k < 1:
            raise Error("whisper_max.select_tokens: choice is not (rows, k >= 1, 2)")
        if rules.dim_size(0) != rows or rules.dim_size(1) != RULES or sampling.dim_size(0) != rows or sampling.dim_size(1) != 2:
            raise Error("whisper_max.select_tokens: rules (rows, 9) and sampling (rows, 2) expected")
        if k > n:
            raise Error("whisper_max.select_tokens: more candidates asked for than there are tokens")
        var sp = suppress.unsafe_ptr()
        for j in range(n_suppress):
            if Int(sp.unsafe_load(j)) < 0 or Int(sp.unsafe_load(j)) >= n:
                raise Error("whisper_max.select_tokens: a suppressed token is outside the vocabulary")
        var scratch = alloc[Float32](rows * (n + k))
        var slots = alloc[Int](rows * k)
        var op = choice.unsafe_ptr()
        var xp = logits.unsafe_ptr()
        var rp = rules.unsafe_ptr()
        var tp = sampling.unsafe_ptr()

        def work(r: Int) {var op, var xp, var rp, var sp, var tp, var scratch, var slots, var n_suppress, var n, var k}:
            _select_row(
                op + r * k * 2, xp + r * n, scratch + r * (n + k), rp + r * RULES, sp, n_suppress,
                tp.unsafe_load(2 * r), tp.unsafe_load(2 * r + 1), slots + r * k, scratch + r * (n + k) + n, n, k,
            )

        parallelize(work, rows)
        scratch.free()
        slots.free()

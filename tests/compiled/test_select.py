"""whisper_max.select_tokens: openai-whisper's next-token choice, sampling, and NaN reports."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class _Tk:
    """The ids openai-whisper's logit filters read, in the tiny vocabulary (50 tokens: text
    0-39, eot 40, specials, timestamps 44-49)."""

    eot, sot, no_timestamps, timestamp_begin = 40, 41, 42, 44

    def encode(self, text):
        assert text == " "
        return [17]


def _filtered(logits, tokens, sample_begin, suppress, blank, timestamps, max_initial):
    """openai-whisper's own logit filters on the logits (torch): the oracle."""
    from whisper.decoding import ApplyTimestampRules, SuppressBlank, SuppressTokens

    x = torch.from_numpy(logits.copy())
    t = torch.from_numpy(tokens)
    filters = ([SuppressBlank(_Tk(), sample_begin)] if blank else []) + [SuppressTokens(suppress)]
    if timestamps:
        filters.append(ApplyTimestampRules(_Tk(), sample_begin, max_initial))
    for f in filters:
        f.apply(x, t)
    return x.numpy(), F.log_softmax(x.float(), dim=-1).numpy()


def test_select_tokens_is_openai_whispers_choice(compiled):
    """The select graph (kernel whisper_max.select_tokens, fed by decoding.TokenRules) picks what
    openai-whisper's filters and argmax / top-k pick, ties to the lower token, with the
    log-probabilities of its log_softmax; the timestamp rules' text ban included."""
    from whisper_max.runtime.decoding import TokenRules

    models = compiled[3]
    rng = np.random.default_rng(0)
    forced = exhausted = 0
    for case in range(400):
        rows, k, sample_begin = int(rng.integers(1, 6)), int(rng.integers(1, 8)), 3
        blank, timestamps = bool(case % 3), bool(case % 4)
        max_initial = None if case % 5 == 0 else int(rng.integers(0, 4))
        suppress = sorted({int(i) for i in rng.integers(0, 50, int(rng.integers(0, 6)))} | {41})
        logits = (rng.standard_normal((rows, 50)) * 3).astype(np.float32)
        logits[:, 44:] += rng.uniform(-4, 6, (rows, 1)).astype(np.float32)
        if case % 7 == 0:
            logits = np.round(logits).astype(np.float32)  # ties
        sampled = [sorted(rng.choice([*range(40), *range(44, 50)], int(rng.integers(0, 5)))) for _ in range(rows)]
        width = sample_begin + min(len(s) for s in sampled)
        tokens = np.array([[41, 1, 2] + s[: width - sample_begin] for s in sampled], np.int64)
        want_logits, want_lp = _filtered(logits, tokens, sample_begin, suppress, blank, timestamps, max_initial)
        rules = TokenRules(_Tk(), sample_begin, blank, suppress, timestamps, max_initial)
        choice = (
            models["select"]
            .execute(
                logits, rules.rows(tokens), rules.suppress, np.zeros((rows, 2), np.float32), np.zeros(k, np.int32)
            )[0]
            .to_numpy()
        )
        want = np.argsort(-want_logits, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(choice[:, :, 0].astype(np.int64), want, err_msg=f"case {case}")
        assert (choice[:, 0, 0] == want_logits.argmax(axis=-1)).all()
        got_lp, ref_lp = choice[:, :, 1], np.take_along_axis(want_lp, want, axis=-1)
        finite = np.isfinite(ref_lp)
        np.testing.assert_array_equal(np.isfinite(got_lp), finite)
        np.testing.assert_allclose(got_lp[finite], ref_lp[finite], rtol=0, atol=2e-6)
        if timestamps:
            forced += int(
                np.sum(np.isneginf(want_logits[:, :44]).all(axis=1) & ~np.isneginf(logits[:, :44]).all(axis=1))
            )
        exhausted += int((~finite).any())
    assert forced > 30 and exhausted > 10  # the text ban and rows with fewer than k tokens left were exercised


def test_select_tokens_samples_and_reports_nan(compiled):
    """Temperature > 0: slot 0 is the first token whose running probability (softmax(logits / T)
    after the filters, float64 sums in token order) passes u times the total, with its log-
    probability at temperature 1. A NaN logit gives a NaN log-probability (decoding raises)."""
    from whisper_max.runtime.decoding import TokenRules

    models = compiled[3]
    rng = np.random.default_rng(1)
    rules = TokenRules(_Tk(), 3, True, [41, 43], True, 1)
    for case in range(200):
        rows, temperature = int(rng.integers(1, 5)), float(rng.choice([0.2, 0.6, 1.0]))
        logits = (rng.standard_normal((rows, 50)) * 2).astype(np.float32)
        tokens = np.array([[41, 1, 2, 44, 7, 9][: 3 + case % 4]] * rows, np.int64)
        u = rng.random(rows).astype(np.float32)
        sampling = np.stack([np.full(rows, temperature, np.float32), u], axis=1)
        choice = (
            models["select"]
            .execute(logits, rules.rows(tokens), rules.suppress, sampling, np.zeros(2, np.int32))[0]
            .to_numpy()
        )
        want_logits, want_lp = _filtered(logits, tokens, 3, [41, 43], True, True, 1)
        for r in range(rows):
            y = (want_logits[r] / np.float32(temperature)).astype(np.float32)
            p = np.exp(y - y.max()).astype(np.float64)
            pick = int(np.argmax(np.cumsum(p) > np.float64(u[r]) * p.sum()))
            assert int(choice[r, 0, 0]) == pick and np.isfinite(want_logits[r, pick])
            np.testing.assert_allclose(choice[r, 0, 1], want_lp[r, pick], rtol=0, atol=2e-6)
            assert choice[r, 1, 0] == -1 and np.isneginf(choice[r, 1, 1])
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    logits[1, 5] = np.nan
    tokens = np.array([[41, 1, 2, 3]] * 2, np.int64)
    choice = (
        models["select"]
        .execute(logits, rules.rows(tokens), rules.suppress, np.zeros((2, 2), np.float32), np.zeros(3, np.int32))[0]
        .to_numpy()
    )
    assert np.isfinite(choice[0, :, 1]).all() and np.isnan(choice[1, 0, 1])

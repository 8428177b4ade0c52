"""Quality tasks through the compressed cache: perplexity and pass-key retrieval.

Every task runs a model through one cache per trial: a :class:`SphkvCache` of a method at a byte
budget, or, for the method ``none``, an uncompressed :class:`transformers.DynamicCache` with the
model's own attention (the baseline). A budget in (0, 1] is a fraction of the fp16 cache of
every token the cache will have seen by the end of the task; above 1 it is bytes
(:func:`sphkv.rdr.budget_to_bytes`).

- :func:`perplexity`: prefill N context tokens (the cache compresses them as the prefill
  returns), then feed the next M tokens teacher-forced through the compressed cache, in chunks,
  and score each next token.
- :func:`passkey`: a 5-digit key sentence at a depth of an N-token haystack, a question in the
  chat template, greedy decoding, exact match of the key; query-aware (question prefilled with
  the context, then compression) or query-agnostic (context prefilled and compressed alone, the
  question fed after, token by token).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import DynamicCache

from sphkv.integrations.hf.cache import SphkvCache, get_method
from sphkv.integrations.hf.config import cache_argument, fp16_cache_bytes
from sphkv.integrations.hf.generate import compressed_attention
from sphkv.rdr import budget_to_bytes

__all__ = ["KEY_SENTENCE", "NONE", "QUESTION", "SETTINGS", "FidelityResult", "PasskeyPrompt",
           "PasskeyResult", "fidelity_runs",
           "PerplexityResult", "budget_bytes", "make_cache", "passkey", "passkey_prompt",
           "passkey_runs", "perplexity", "perplexity_runs", "scored_nll"]

#: the method name of the uncompressed baseline (a plain ``DynamicCache``)
NONE = "none"
#: pass-key settings: the question prefilled before compression, or fed after it
SETTINGS = ("query-aware", "query-agnostic")
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the 5-digit number only."
# separates the context from the question inside the chat template's user message
_SENTINEL = "\x00SPHKV-CONTEXT\x00"


def budget_bytes(model, budget: float, tokens: int) -> float:
    """Bytes of a budget for a cache that ends up seeing ``tokens`` tokens of one sequence.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    budget : float
        In (0, 1]: a fraction of the fp16 cache of ``tokens`` tokens; above 1: bytes
        (:func:`sphkv.rdr.budget_to_bytes`).
    tokens : int
    """
    return budget_to_bytes(budget, fp16_cache_bytes(model.config, 1, tokens))


def make_cache(model, method: str, budget: float, window: int | None = None, sinks: int = 4,
               page_size: int = 16, head_weights=None):
    """A fresh cache: ``DynamicCache`` for ``none``, else a :class:`SphkvCache` of ``budget``
    bytes."""
    if method == NONE:
        return DynamicCache(config=model.config)
    return SphkvCache(model.config, budget, get_method(method), window=window, sinks=sinks,
                      page_size=page_size, head_weights=head_weights)


def _check_method(method: str) -> None:
    if method != NONE:
        get_method(method)  # raises ValueError naming the methods


@contextlib.contextmanager
def _attention(model, method: str):
    """The ``sphkv`` attention for a compressed cache, the model's own for ``none``."""
    if method == NONE:
        yield
    else:
        with compressed_attention(model):
            yield


def _cache_bytes(cache, model, tokens: int) -> tuple[int, int]:
    """(peak bytes, fp16 bytes of ``tokens`` tokens); an uncompressed cache counts as fp16."""
    fp16 = fp16_cache_bytes(model.config, 1, tokens)
    return (cache.peak_bytes if isinstance(cache, SphkvCache) else fp16), fp16


@dataclass
class PerplexityResult:
    """Perplexity of M tokens scored after an N-token context.

    Attributes
    ----------
    nll : float
        Mean negative log-likelihood (nats per token) of the scored tokens.
    ppl : float
        ``exp(nll)``.
    cache_bytes_peak : int
        Largest accounted size of the cache after any step (fp16 bytes for ``none``).
    fp16_bytes : int
        The fp16 cache of the N + M tokens the cache has seen at the end.
    budget_bytes : int
        The budget (fp16 bytes for ``none``).
    token_nll : list of float
        Each scored token's negative log-likelihood, in order (their mean is ``nll``): two
        runs on the same tokens compare token by token.
    """

    method: str
    context: int
    scored: int
    chunk: int
    nll: float
    ppl: float
    cache_bytes_peak: int
    fp16_bytes: int
    budget_bytes: int
    seconds: float
    token_nll: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model, ids: torch.Tensor, context: int, scored: int, budget: float = 0.125,
               method: str = "rdr", chunk: int = 8, window: int | None = None, sinks: int = 4,
               page_size: int = 16, head_weights=None) -> PerplexityResult:
    """Perplexity of ``scored`` tokens read through a cache compressed after ``context`` tokens.

    With ids x_0 … x_{N+M}: the prefill feeds x_0 … x_{N-1} (its logits are not scored: they
    were computed before compression); then x_N … x_{N+M-1} are fed in chunks of ``chunk``
    tokens and position N+j predicts x_{N+j+1}, so every scored logit is read from the
    compressed cache. nll = −(1/M) Σ_j log softmax(logits_{N+j})[x_{N+j+1}], ppl = e^nll.

    Within a chunk the queries also see the chunk's own tokens at fp16 in the window, which
    token-by-token decoding would already have admitted into pages when the window reached 2W
    tokens; ``chunk=1`` is exact decoding, ``chunk <= window`` keeps the difference to at most
    one admission per chunk. The window then holds up to 2W − 1 + ``chunk`` tokens at fp16
    before the chunk's admissions; ``cache_bytes_peak`` counts that state (the cache records
    its bytes before each admission), so only ``chunk=1`` guarantees it within the budget.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    ids : torch.Tensor
        int ``[T]`` with ``T >= context + scored + 1``.
    context, scored : int
        N and M.
    budget : float
        In (0, 1]: a fraction of the fp16 cache of N + M tokens; above 1: bytes. Ignored for
        ``none``.
    method : str
        ``none`` or a key of :data:`sphkv.integrations.hf.methods.METHODS`.
    chunk : int
        Tokens per teacher-forced forward after the prefill: by default 8, the shortest window
        the budget chooses.
    window, sinks, page_size, head_weights
        See :class:`SphkvCache` (a ``sensitive`` method needs ``head_weights``).
    """
    return perplexity_runs(model, ids, context, scored, [(method, budget)], chunk, window,
                           sinks, page_size, head_weights=head_weights)[0]


def scored_nll(model, ids: torch.Tensor, cache, context: int, scored: int,
               chunk: int = 8) -> torch.Tensor:
    """Each of the ``scored`` tokens' negative log-likelihood (float64 ``[scored]``) after the
    ``context`` tokens ``cache`` holds, fed ``chunk`` at a time through it."""
    token_nll = []
    for a in range(context, context + scored, chunk):
        b = min(a + chunk, context + scored)
        logits = model(ids[None, a:b], **{cache_argument(model): cache},
                       use_cache=True).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        token_nll.append(-logp.gather(-1, ids[a + 1:b + 1, None])[:, 0])
    return torch.cat(token_nll)


def perplexity_runs(model, ids: torch.Tensor, context: int, scored: int,
                    runs: list[tuple[str, float]], chunk: int = 8, window: int | None = None,
                    sinks: int = 4, page_size: int = 16,
                    observation: int | None = None,
                    head_weights=None) -> list[PerplexityResult]:
    """:func:`perplexity` for several ``(method, budget)`` runs on one context, sharing the
    prefill: compressed methods copy one deferred cache (:meth:`SphkvCache.compress`) that
    prefilled the context once, exactly as each would have after its own prefill. A result's
    ``seconds`` leaves the shared prefill out; ``observation`` overrides every method's
    observed prompt queries (:class:`SphkvCache`)."""
    ids = torch.as_tensor(ids).reshape(-1)
    for method, _ in runs:
        _check_method(method)
    if context < 1 or scored < 1 or chunk < 1:
        raise ValueError(f"need context >= 1, scored >= 1, chunk >= 1; got {context}, "
                         f"{scored}, {chunk}")
    if ids.numel() < context + scored + 1:
        raise ValueError(f"perplexity of {scored} tokens after {context} needs "
                         f"{context + scored + 1} token ids, got {ids.numel()}")
    total = context + scored
    shared = None
    results = []
    with torch.no_grad():
        for method, budget in runs:
            limit = budget_bytes(model, budget, total) if method != NONE else 0.0
            with _attention(model, method):
                if method == NONE:
                    cache = make_cache(model, method, limit)
                    start = time.perf_counter()
                    model(ids[None, :context], **{cache_argument(model): cache}, use_cache=True)
                else:
                    if shared is None:
                        shared = SphkvCache(model.config, None, window=window, sinks=sinks,
                                            page_size=page_size, observation=observation,
                                            head_weights=head_weights)
                        model(ids[None, :context], **{cache_argument(model): shared},
                              use_cache=True)
                    start = time.perf_counter()
                    cache = shared.compress(get_method(method), limit)
                nll = scored_nll(model, ids, cache, context, scored, chunk)
            peak, fp16 = _cache_bytes(cache, model, total)
            mean = float(nll.sum()) / scored
            results.append(PerplexityResult(
                method, context, scored, chunk, mean, math.exp(mean), int(peak), int(fp16),
                int(limit) if method != NONE else int(fp16), time.perf_counter() - start,
                nll.tolist()))
    return results


@dataclass
class FidelityResult:
    """Attention-output error of a compressed cache right after compression, per layer.

    Attributes
    ----------
    layer_errors : list of float
        ``‖O' − O‖_F / ‖O‖_F`` per layer: O the attention outputs of the last W prefill queries
        (every query head) over the fp16 cache, O' the same queries over the compressed one.
    mean_error : float
        Mean of ``layer_errors``.
    cache_bytes : int
        The compressed cache's accounted bytes.
    """

    method: str
    context: int
    layer_errors: list
    mean_error: float
    cache_bytes: int
    fp16_bytes: int
    budget_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def fidelity_runs(model, ids: torch.Tensor, context: int, runs: list[tuple[str, float]],
                  window: int | None = None, sinks: int = 4, page_size: int = 16,
                  head_weights=None) -> list[FidelityResult]:
    """Per-layer attention-output relative error of each ``(method, budget)`` run after
    compressing a ``context``-token prefill (shared, see :func:`perplexity_runs`); a budget in
    (0, 1] is a fraction of the fp16 cache of the context. ``none`` has error 0 by definition.
    The queries are the observation window's (the last W prefill positions, after RoPE), so
    the error is the one the allocator's distortion model predicts, measured exactly."""
    ids = torch.as_tensor(ids).reshape(-1)
    for method, _ in runs:
        _check_method(method)
    if not 1 <= context <= ids.numel():
        raise ValueError(f"context must be in [1, {ids.numel()}] (the ids given), got {context}")
    shared = SphkvCache(model.config, None, window=window, sinks=sinks, page_size=page_size,
                        head_weights=head_weights)
    with torch.no_grad(), compressed_attention(model):
        model(ids[None, :context], **{cache_argument(model): shared}, use_cache=True)
    scaling = shared.head_dim ** -0.5
    # the window's queries [B, H_q, W, d] of every layer (as the cache kept them, after RoPE),
    # and their outputs over the fp16 cache; a window chosen by the budget: the long one's
    queries = {i: q[:, :, -shared.window:] for i, q in shared._queries.items()}
    reference = {i: shared.layers[i].attend(q, None, scaling) for i, q in queries.items()}
    fp16 = fp16_cache_bytes(model.config, 1, context)
    out = []
    for method, budget in runs:
        start = time.perf_counter()
        if method == NONE:
            errors, nbytes, limit = [0.0] * len(queries), fp16, fp16
        else:
            limit = budget_bytes(model, budget, context)
            cache = shared.compress(get_method(method), limit)
            errors = []
            for i, q in queries.items():
                o = cache.layers[i].attend(q, None, scaling).double()
                errors.append(float((o - reference[i]).norm() / reference[i].norm()))
            nbytes = cache.nbytes()
        out.append(FidelityResult(method, context, errors, float(np.mean(errors)), int(nbytes),
                                  int(fp16), int(limit), time.perf_counter() - start))
    return out


@dataclass
class PasskeyPrompt:
    """A pass-key prompt in two parts, split where query-agnostic compression happens.

    Attributes
    ----------
    context : torch.Tensor
        int ``[n]``: the chat template's opening, then the haystack with the key sentence.
    question : torch.Tensor
        int ``[q]``: the question and the template up to the assistant's turn.
    key : str
    depth : float
        Requested depth of the key sentence in the haystack, in [0, 1].
    key_start, key_end : int
        The key sentence's token span in ``context``.
    haystack_start : int
        Index of the haystack's first token in ``context`` (after the template's opening).
    """

    context: torch.Tensor
    question: torch.Tensor
    key: str
    depth: float
    key_start: int
    key_end: int
    haystack_start: int

    @property
    def ids(self) -> torch.Tensor:
        """The whole prompt, ``[n + q]``."""
        return torch.cat([self.context, self.question])


def _template(tokenizer, question: str) -> tuple[str, str]:
    """The text before and after the context in a one-message user turn.

    With a chat template: the template applied to ``context + "\\n\\n" + question`` with the
    generation prompt, split at the context. Without one: nothing before, then the question
    and ``Answer:``.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{_SENTINEL}\n\n{question}"}], tokenize=False,
            add_generation_prompt=True)
        before, after = text.split(_SENTINEL)
        return before, after
    return "", f"\n\n{question}\nAnswer:"


def passkey_prompt(tokenizer, haystack: torch.Tensor, key: str, depth: float,
                   question: str = QUESTION) -> PasskeyPrompt:
    """Insert the key sentence at ``depth`` of a haystack and wrap it in the chat template.

    The haystack is cut so that haystack plus key sentence hold ``len(haystack)`` tokens; the
    sentence goes before haystack token ``round(depth · len(cut haystack))``.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
    haystack : torch.Tensor
        int ``[N]``, filler text.
    key : str
        Five digits.
    depth : float
        In [0, 1]: 0 puts the key first, 1 last.
    question : str
    """
    if not re.fullmatch(r"\d{5}", key):
        raise ValueError(f"the pass key must be 5 digits, got {key!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    haystack = torch.as_tensor(haystack).reshape(-1)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids,
                            dtype=torch.long)

    needle = encode(KEY_SENTENCE.format(key=key))
    room = haystack.numel() - needle.numel()
    if room < 1:
        raise ValueError(f"a {haystack.numel()}-token haystack cannot hold the "
                         f"{needle.numel()}-token key sentence")
    cut = haystack[:room]
    at = round(depth * room)
    before, after = _template(tokenizer, question)
    opening = encode(before) if before else torch.zeros(0, dtype=torch.long)
    context = torch.cat([opening, cut[:at], needle, cut[at:]])
    start = opening.numel() + at
    return PasskeyPrompt(context, encode(after), key, depth, start, start + needle.numel(),
                         opening.numel())


def _greedy(model, cache, logits: torch.Tensor, chunks: list[torch.Tensor],
            max_new_tokens: int, eos: set[int]) -> list[int]:
    """From the last prefill logits, feed ``chunks`` in order through ``cache``, then decode
    greedily until EOS."""
    for c in chunks:
        logits = model(c[None], **{cache_argument(model): cache}, use_cache=True).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        logits = model(torch.tensor([[token]]), **{cache_argument(model): cache},
                       use_cache=True).logits[0, -1]
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list | tuple) else [value] if value is not None
                   else [])
    return ids


@dataclass
class PasskeyResult:
    """Pass-key retrieval over trials.

    Attributes
    ----------
    accuracy : float
        Fraction of trials whose answer's first number is the key.
    trials : list of dict
        Per trial: ``key``, ``depth``, ``answer``, ``correct``, ``prompt_tokens``,
        ``cache_bytes_peak``, ``fp16_bytes``, ``budget_bytes``.
    """

    method: str
    setting: str
    context: int
    correct: int
    n_trials: int
    accuracy: float
    cache_bytes_peak: int
    fp16_bytes: int
    seconds: float
    trials: list

    def to_dict(self) -> dict:
        return asdict(self)


def passkey(model, tokenizer, haystack: torch.Tensor, budget: float = 0.125,
            method: str = "rdr", setting: str = "query-agnostic", trials: int = 4,
            depth: float | None = None, max_new_tokens: int = 20, seed: int = 0,
            question: str = QUESTION, window: int | None = None, sinks: int = 4,
            page_size: int = 16, head_weights=None) -> PasskeyResult:
    """Pass-key retrieval accuracy through a compressed cache.

    Trial i hides a random 5-digit key (from ``seed``) at ``depth``, or, when ``depth`` is
    None, at the i-th of ``trials`` depths evenly spaced over 10 % … 90 %. ``query-aware``
    prefills context and question together, so the cache is compressed with the question's
    queries in the observation window (SnapKV's setting); ``query-agnostic`` prefills and
    compresses the context alone and feeds the question after, one token per forward. Then
    greedy decoding of at most ``max_new_tokens``; a trial is correct when the first number in
    the answer is the key.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers.PreTrainedTokenizerBase
    haystack : torch.Tensor
        int ``[N]``, filler text; the context holds N tokens with the key sentence.
    budget : float
        In (0, 1]: a fraction of the fp16 cache of prompt plus ``max_new_tokens`` tokens;
        above 1: bytes. Ignored for ``none``.
    method : str
        ``none`` or a key of :data:`sphkv.integrations.hf.methods.METHODS`.
    setting : str
        One of :data:`SETTINGS`.
    trials : int
    depth : float, optional
        In [0, 1].
    max_new_tokens : int
    seed : int
    question : str
        Asked after the haystack, inside the user turn.
    window, sinks, page_size, head_weights
        See :class:`SphkvCache` (a ``sensitive`` method needs ``head_weights``).
    """
    return passkey_runs(model, tokenizer, haystack, [(method, budget)], setting, trials, depth,
                        max_new_tokens, seed, question, window, sinks, page_size,
                        head_weights)[0]


def passkey_runs(model, tokenizer, haystack: torch.Tensor, runs: list[tuple[str, float]],
                 setting: str = "query-agnostic", trials: int = 4, depth: float | None = None,
                 max_new_tokens: int = 20, seed: int = 0, question: str = QUESTION,
                 window: int | None = None, sinks: int = 4, page_size: int = 16,
                 head_weights=None) -> list[PasskeyResult]:
    """:func:`passkey` for several ``(method, budget)`` runs on the same trials, sharing each
    trial's prefill among the compressed methods (see :func:`perplexity_runs`)."""
    for method, _ in runs:
        _check_method(method)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    if trials < 1 or max_new_tokens < 1:
        raise ValueError(f"need trials >= 1 and max_new_tokens >= 1; got {trials}, "
                         f"{max_new_tokens}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    depths = [depth] * trials if depth is not None else \
        np.linspace(0.1, 0.9, trials).tolist() if trials > 1 else [0.5]
    rng = np.random.default_rng(seed)
    prompts = [passkey_prompt(tokenizer, haystack, str(rng.integers(10000, 100000)), d,
                              question) for d in depths]
    eos = _eos_ids(model, tokenizer)
    rows: list[list[dict]] = [[] for _ in runs]
    seconds = [0.0] * len(runs)
    with torch.no_grad():
        for prompt in prompts:
            total = prompt.ids.numel() + max_new_tokens
            # query-agnostic: the question arrives token by token after compression, so the
            # window never holds more than 2W tokens and the cache stays within its budget
            first, rest = ((prompt.ids, []) if setting == "query-aware" else
                           (prompt.context, list(prompt.question[:, None])))
            shared = shared_logits = None
            for i, (method, budget) in enumerate(runs):
                limit = budget_bytes(model, budget, total) if method != NONE else 0.0
                with _attention(model, method):
                    if method == NONE:
                        start = time.perf_counter()
                        cache = make_cache(model, method, limit)
                        logits = model(first[None], **{cache_argument(model): cache},
                                       use_cache=True).logits[0, -1]
                    else:
                        if shared is None:
                            shared = SphkvCache(model.config, None, window=window, sinks=sinks,
                                                page_size=page_size, head_weights=head_weights)
                            shared_logits = model(first[None], **{cache_argument(model): shared},
                                                  use_cache=True).logits[0, -1]
                        start = time.perf_counter()
                        cache, logits = shared.compress(get_method(method), limit), shared_logits
                    answer = tokenizer.decode(_greedy(model, cache, logits, rest,
                                                      max_new_tokens, eos),
                                              skip_special_tokens=True)
                seconds[i] += time.perf_counter() - start
                numbers = re.findall(r"\d+", answer)
                peak, fp16 = _cache_bytes(cache, model, total)
                rows[i].append({"key": prompt.key, "depth": prompt.depth, "answer": answer,
                                "correct": bool(numbers) and numbers[0] == prompt.key,
                                "prompt_tokens": int(prompt.ids.numel()),
                                "cache_bytes_peak": int(peak), "fp16_bytes": int(fp16),
                                "budget_bytes": int(limit) if method != NONE else int(fp16)})
    out = []
    for (method, _), r, sec in zip(runs, rows, seconds, strict=True):
        correct = sum(x["correct"] for x in r)
        out.append(PasskeyResult(method, setting, int(haystack.numel()), correct, len(r),
                                 correct / len(r), max(x["cache_bytes_peak"] for x in r),
                                 max(x["fp16_bytes"] for x in r), sec, r))
    return out

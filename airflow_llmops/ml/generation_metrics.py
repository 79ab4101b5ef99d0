"""Reference-based scores of generated answers (ROUGE-L, BLEU, chrF) and an optional LLM judge.

All three reference metrics are corpus scores in [0, 1] (higher is better):

- **ROUGE-L** (F-measure), implemented here: Lin, C.-Y. (2004), "ROUGE: A Package for Automatic Evaluation of
  Summaries", Text Summarization Branches Out, ACL, section 3.1: with X the reference (m tokens), Y the candidate
  (n tokens) and LCS(X, Y) the length of their longest common subsequence, ``R = LCS/m``, ``P = LCS/n`` and
  ``F = (1 + beta^2) R P / (R + beta^2 P)``. ``beta = 1`` (the F1 that Google's ``rouge-score`` package reports);
  tokens are lower-cased runs of word characters, as ``rouge-score`` tokenizes (without stemming). The corpus score
  is the mean of the per-answer F-measures. No library in the lock file implements it, and the definition is a
  dozen lines, so it lives here rather than as a new dependency.
- **BLEU**: NLTK's ``corpus_bleu`` (Papineni et al., 2002), up to 4-grams, smoothing method 1 of Chen & Cherry
  (2014) so that an answer without a matching 4-gram does not zero the score, weights re-balanced for corpora
  shorter than 4 tokens; case-sensitive, words and punctuation as tokens.
- **chrF**: NLTK's ``corpus_chrf`` (Popovic, 2015): character n-grams 1..6, beta = 3, whitespace ignored.

The judge (:func:`judge_answers`) asks any OpenAI-compatible chat-completions endpoint to grade each answer from 1 to
10 with a fixed rubric (:data:`JUDGE_RUBRIC`). No Airflow here: the caller passes the API key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_ROUGE_TOKEN = re.compile(r"\w+", re.UNICODE)
_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)

#: The metrics computed from references; all of them are higher-is-better.
REFERENCE_METRICS = ("rouge_l", "bleu", "chrf")


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time: O(len(a) * len(b)) time,
    O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, candidate: str, *, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of one candidate against one reference (Lin 2004, section 3.1); 0.0 when either side has
    no token."""
    ref, cand = rouge_tokens(reference), rouge_tokens(candidate)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(ref), lcs / len(cand)
    return (1 + beta**2) * recall * precision / (recall + beta**2 * precision)


def corpus_rouge_l(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Mean per-answer ROUGE-L F-measure."""
    _same_length(references, candidates)
    if not references:
        return 0.0
    return sum(rouge_l(r, c) for r, c in zip(references, candidates, strict=True)) / len(references)


def bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKEN.findall(text)


def corpus_bleu(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Corpus BLEU-4 (NLTK), smoothed (Chen & Cherry method 1); 0.0 for an empty corpus."""
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    _same_length(references, candidates)
    hypotheses = [bleu_tokens(c) for c in candidates]
    if not any(hypotheses):
        return 0.0
    score = nltk_corpus_bleu(
        [[bleu_tokens(r)] for r in references],
        hypotheses,
        smoothing_function=SmoothingFunction().method1,
        auto_reweigh=True,
    )
    return _unit(score)


def corpus_chrf(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Corpus chrF (NLTK: character 1..6-grams, beta 3); 0.0 for an empty corpus or all-empty answers."""
    from nltk.translate.chrf_score import corpus_chrf as nltk_corpus_chrf

    _same_length(references, candidates)
    if not any(c.strip() for c in candidates):
        return 0.0
    return _unit(nltk_corpus_chrf(list(references), list(candidates)))


def reference_metrics(references: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
    """``rouge_l``, ``bleu`` and ``chrf`` of the candidates (empty dict when there is nothing to score)."""
    if not references:
        return {}
    return {
        "rouge_l": corpus_rouge_l(references, candidates),
        "bleu": corpus_bleu(references, candidates),
        "chrf": corpus_chrf(references, candidates),
    }


def _unit(value: Any) -> float:
    """NLTK returns 1e-16-ish floats for 'nothing matched'; clamp to [0, 1] and round away float noise."""
    return min(1.0, max(0.0, round(float(value), 12)))


def _same_length(references: Sequence[str], candidates: Sequence[str]) -> None:
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")


# --------------------------------------------------------------------------- judge

#: The fixed rubric the judge grades with; the prompt, reference and answer follow it.
JUDGE_RUBRIC = (
    "You are grading an AI assistant's answer to a user. Compare the answer with the reference answer and grade it "
    "from 1 to 10:\n"
    "10: as correct, relevant and helpful as the reference (wording may differ).\n"
    "7-9: correct and relevant, with small omissions or awkward wording.\n"
    "4-6: partly correct or partly relevant; misses important content of the reference.\n"
    "2-3: mostly wrong, off-topic or hard to understand.\n"
    "1: empty, nonsensical, harmful, or a copy of the question.\n"
    "Reply with the grade only, as a single integer from 1 to 10."
)

_GRADE = re.compile(r"\b(10|[1-9])\b")


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or gave no usable grade."""


def judge_messages(prompt: str, reference: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_RUBRIC},
        {
            "role": "user",
            "content": (
                f"Conversation (prompt):\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"
            ),
        },
    ]


def parse_grade(text: str | None) -> int | None:
    """The first integer 1..10 in the judge's reply, or None."""
    match = _GRADE.search(text or "")
    return int(match.group(1)) if match else None


def judge_answers(
    samples: Sequence[Mapping[str, str]],
    *,
    base_url: str,
    model: str,
    api_key: str | None,
    timeout_s: float = 60.0,
    max_retries: int = 2,
) -> list[int | None]:
    """Grades 1..10 of each sample's ``answer`` (given its ``prompt`` and ``reference``) from an OpenAI-compatible
    endpoint, temperature 0; ``None`` where the reply held no grade.

    :raises JudgeError: the endpoint failed (the message names the endpoint and the error type, never the key).
    """
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=max_retries)
    grades: list[int | None] = []
    try:
        for sample in samples:
            completion = client.chat.completions.create(
                model=model,
                messages=judge_messages(sample["prompt"], sample["reference"], sample["answer"]),  # type: ignore[arg-type]
                temperature=0,
                max_tokens=8,
            )
            content = completion.choices[0].message.content if completion.choices else None
            grades.append(parse_grade(content))
    except openai.OpenAIError as err:
        status = getattr(err, "status_code", None)
        raise JudgeError(
            f"judge {model!r} at {base_url} failed: {type(err).__name__}" + (f" (HTTP {status})" if status else "")
        ) from None
    finally:
        client.close()
    return grades

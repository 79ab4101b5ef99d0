"""Reference metrics of generated answers (ROUGE-L by hand, NLTK's BLEU and chrF), the judge over real HTTP, and the
samples table of the evaluation report."""

from __future__ import annotations

import pytest
from standins.openai_compatible import OpenAICompatibleStandIn

from airflow_llmops.ml import generation_metrics as G
from airflow_llmops.ml.evaluation_report import render


def test_lcs_length_known_values() -> None:
    assert G.lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: BCBA
    assert G.lcs_length([], ["a"]) == G.lcs_length(["a"], []) == 0
    assert G.lcs_length(["a", "b", "c"], ["a", "b", "c"]) == 3
    assert G.lcs_length(["a", "b"], ["c", "d"]) == 0


def test_rouge_l_lin_2004_example() -> None:
    # Lin (2004), section 3.1.1: reference S1 against candidates S2 and S3 (beta=1: P = R, F = LCS / 4).
    s1 = "police killed the gunman"
    assert G.rouge_l(s1, "police kill the gunman") == pytest.approx(3 / 4)  # "police the gunman"
    assert G.rouge_l(s1, "the gunman kill police") == pytest.approx(2 / 4)  # "the gunman"


def test_rouge_l_rouge_score_readme_example() -> None:
    # rouge-score's README: rougeL of 'The quick brown dog jumps on the log.' against 'The quick brown fox jumps
    # over the lazy dog': LCS "the quick brown jumps the" = 5, P = 5/8, R = 5/9, F1 = 2PR/(P+R) = 10/17.
    score = G.rouge_l("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.")
    assert score == pytest.approx(10 / 17) == pytest.approx(0.5882352941176471)


def test_rouge_l_edges_and_beta() -> None:
    assert G.rouge_l("Hello, World!", "hello world") == 1.0  # lower-cased words, punctuation dropped
    assert G.rouge_l("a b c", "d e f") == 0.0
    assert G.rouge_l("", "a") == G.rouge_l("a", "") == 0.0
    # LCS 2 of reference 4 and candidate 2: R = 1/2, P = 1; beta=2 weighs recall: 5 * 0.5 / (0.5 + 4) = 5/9.
    assert G.rouge_l("a b c d", "a b", beta=2.0) == pytest.approx(5 / 9)
    assert G.corpus_rouge_l(["a b", "a b"], ["a b", "c d"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 references but 1 candidates"):
        G.corpus_rouge_l(["a", "b"], ["a"])


def test_bleu_and_chrf_on_identical_and_disjoint_texts() -> None:
    refs = ["The parcel left the depot yesterday.", "It arrives tomorrow before noon."]
    assert G.corpus_bleu(refs, refs) == pytest.approx(1.0)
    assert G.corpus_chrf(refs, refs) == pytest.approx(1.0)
    disjoint = ["zebra xylophone quartz", "mmm vvv kkk"]
    assert G.corpus_bleu(refs, disjoint) == 0.0
    assert G.corpus_chrf(["abc def"], ["xyz uvw"]) == 0.0
    # Short identical answers score 1 too (weights re-balanced below 4 tokens), and an empty answer 0.
    assert G.corpus_bleu(["yes"], ["yes"]) == pytest.approx(1.0)
    assert G.corpus_bleu(["yes"], [""]) == G.corpus_chrf(["yes"], [""]) == 0.0
    partial = G.reference_metrics(refs, ["The parcel left the depot today.", "It arrives tomorrow."])
    assert set(partial) == {"rouge_l", "bleu", "chrf"} and all(0 < v < 1 for v in partial.values())
    assert G.reference_metrics([], []) == {}


def test_parse_grade() -> None:
    assert G.parse_grade("7") == 7
    assert G.parse_grade("Grade: 10/10") == 10
    assert G.parse_grade("I'd say 3.") == 3
    assert G.parse_grade("eleven") is None and G.parse_grade(None) is None and G.parse_grade("0") is None


def test_judge_grades_each_answer_over_http_with_the_rubric_and_the_key() -> None:
    samples = [
        {"prompt": "<|user|>\nHi\n<|assistant|>\n", "reference": "Hello!", "answer": "Hello there!"},
        {"prompt": "<|user|>\nBye\n<|assistant|>\n", "reference": "Goodbye.", "answer": "banana"},
    ]

    def reply(body: dict) -> str:
        return "9" if "Hello there!" in body["messages"][1]["content"] else "Grade: 2"

    with OpenAICompatibleStandIn(reply) as judge:
        grades = G.judge_answers(samples, base_url=judge.base_url, model="judge-1", api_key="sk-secret")
    assert grades == [9, 2]
    assert [r["authorization"] for r in judge.requests] == ["Bearer sk-secret"] * 2
    body = judge.requests[0]["body"]
    assert body["model"] == "judge-1" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": G.JUDGE_RUBRIC}
    assert "Reference answer:\nHello!" in body["messages"][1]["content"]


def test_judge_failure_names_the_endpoint_not_the_key() -> None:
    with OpenAICompatibleStandIn(status=401) as judge, pytest.raises(G.JudgeError) as caught:
        G.judge_answers(
            [{"prompt": "p", "reference": "r", "answer": "a"}],
            base_url=judge.base_url,
            model="judge-1",
            api_key="sk-secret",
            max_retries=0,
        )
    assert "judge-1" in str(caught.value) and "HTTP 401" in str(caught.value)
    assert "sk-secret" not in str(caught.value)


def test_report_samples_table_is_escaped_and_pairs_the_champion() -> None:
    challenger = {
        "source": "/models/new",
        "metrics": {"perplexity": 3.0, "rouge_l": 0.5},
        "samples": [{"prompt": "<|user|>\n<script>x</script>", "reference": "a & b", "answer": "<b>hi</b>"}],
        "notes": ["1 of 2 evaluation conversations are longer than max_seq_length=8 tokens and were truncated"],
    }
    champion = {
        "source": "models:/m/1",
        "metrics": {"perplexity": 4.0, "rouge_l": 0.25},
        "samples": [{"answer": "old"}],
    }
    page = render(
        title="t", decision={"passed": True, "message": "ok"}, challenger=challenger, champion=champion, context={}
    )
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "a &amp; b" in page
    assert "challenger answer" in page and "champion answer" in page and ">old<" in page
    assert "truncated" in page
    alone = render(
        title="t", decision={"passed": True, "message": "ok"}, challenger=challenger, champion=None, context={}
    )
    assert "challenger answer" in alone and "champion answer" not in alone

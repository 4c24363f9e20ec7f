"""MeQSum prompt (as the harness's stock task) and ROUGE-L with the `rouge_score` package the project uses."""

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def doc_to_text(doc) -> str:
    # The question proper follows a "MESSAGE" header in many records: keep what follows it.
    text = doc["CHQ"]
    index = text.find("MESSAGE")
    return text[index + 9:] if index != -1 else text


def process_results(doc, results) -> dict:
    return {"rougeL": _SCORER.score(doc["Summary"], results[0])["rougeL"].fmeasure}

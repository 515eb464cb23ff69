"""Benchmark metrics, computed the way each benchmark's own scorer (or the field) computes them.

Pure functions. Per-sample rules turn an answer into what is scored (`normalize_answer`,
`yes_no_label`, `extract_choice`, `is_blank`); aggregates turn per-sample verdicts or whole
corpora into scores. Every score is a percentage (0-100), except MME's, which are in MME's
points: a category scores accuracy + accuracy+ (up to 200), the totals add categories up.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import defaultdict

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""MME's category lists, as in its eval tool (`calculation.py`)."""
DURATIONS = ("short", "medium", "long")
"""Video-MME's duration buckets (< 2 min, 4-15 min, 30-60 min)."""
LOWER_IS_BETTER = {"wer", "cer", "false_rejection"}
BLEU_TOKENIZERS = {"zh": "zh", "ja": "char"}
"""sacrebleu tokenizer by target language; 13a otherwise. Japanese is scored on characters
(the field uses ja-mecab, which needs MeCab installed)."""


# --------------------------------------------------------------------------- per-sample rules


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def yes_no_label(text: str) -> str:
    """"yes", "no" or "other" by MME's rule: the whole answer, else "yes"/"no" in its first 4 characters.

    As in MME's eval tool, "not sure" reads as "no" (its first characters hold "no").
    """
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, by rules; None when it names none or several.

    options: letter -> option text. Tried in order, letters before option text (as VLMEvalKit's
    `can_infer`): the answer is a letter ("b", "(B)", "B.") or exactly one option's text ("12");
    it starts with a letter ("B. a cat", "(B) a cat", "B, because"); it says so ("Answer: B", "the
    answer is (B)", "option B"); exactly one option letter stands alone in it outside the options'
    texts ("I pick B", "not red, so B", "A is right"; not the D of "Vitamin D"), "A" before
    another lowercase word ("A cat is ...") being the article; it holds exactly one option's
    text as whole words ("It is a blue car").
    """
    letters = "".join(re.escape(letter) for letter in options)
    if not letters:
        return None
    stripped = text.strip()
    bare = re.fullmatch(r"\W*(\w)\W*", stripped)
    if bare and bare.group(1).upper() in options:
        return bare.group(1).upper()
    whole = [letter for letter, option in options.items() if _words(option) and _words(option) == _words(stripped)]
    if len(whole) == 1:
        return whole[0]
    for pattern in (rf"^[(\[]?([{letters}])(?:[.):\],]|$)",
                    rf"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*[(\[]?([{letters}])\b"):
        found = re.search(pattern, stripped)
        if found:
            return found.group(1)
    masked = stripped  # an option's own text ("Vitamin D") names that option, not letter D
    for option in sorted((o.strip() for o in options.values() if o.strip()), key=len, reverse=True):
        masked = re.sub(rf"(?<!\w){re.escape(option)}(?!\w)", " ", masked, flags=re.IGNORECASE)
    alone = {m.group(1) for m in re.finditer(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", masked)
             if not (m.group(1) == "A" and re.match(r"\s+(?!(?:is|was)\b)[a-z]", masked[m.end():]))}
    if alone:
        return alone.pop() if len(alone) == 1 else None
    named = [letter for letter, option in options.items()
             if _words(option) and re.search(rf"(?<!\w){re.escape(_words(option))}(?!\w)", _words(stripped))]
    return named[0] if len(named) == 1 else None


def _words(text: str) -> str:
    """Lower-case words separated by single spaces, punctuation dropped: how option texts are compared."""
    return " ".join(re.findall(r"\w+", text.lower()))


def is_blank(text: str) -> bool:
    """The model stayed silent: background rejection counts an empty or whitespace-only answer."""
    return not text.strip()


# --------------------------------------------------------------------------- aggregates of verdicts


def accuracy(correct: list[bool]) -> float:
    """% of True."""
    if not correct:
        raise ValueError("no samples to score")
    return 100.0 * sum(map(bool, correct)) / len(correct)


def same_answer(prediction: str, reference: str) -> bool:
    """Exact match's per-sample verdict: equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def same_words(prediction: str, reference: str) -> bool:
    """Word for word, case and punctuation aside: a transcript's verdict (articles count, unlike
    `same_answer`'s)."""
    return _words(prediction) == _words(reference)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """% of predictions equal to their reference after `normalize_answer`."""
    return accuracy([same_answer(p, r) for p, r in zip(predictions, references, strict=True)])


def yes_no_scores(images: list[str], correct: list[bool]) -> dict[str, float]:
    """Accuracy over questions and accuracy+ over images (every question of the image right), as MME."""
    by_image = defaultdict(list)
    for image, right in zip(images, correct, strict=True):
        by_image[image].append(right)
    return {"accuracy": accuracy(correct), "accuracy_plus": accuracy([all(v) for v in by_image.values()])}


def mme_scores(categories: list[str], images: list[str], correct: list[bool]) -> dict[str, float]:
    """MME: per category accuracy + accuracy+ (in %, so up to 200); perception and cognition totals.

    Totals add the categories of `MME_PERCEPTION` / `MME_COGNITION` that are present (the full
    benchmark: 2000 and 800 at most). Also the overall accuracy and accuracy+.
    """
    by_category = defaultdict(lambda: ([], []))
    for category, image, right in zip(categories, images, correct, strict=True):
        by_category[category][0].append(image)
        by_category[category][1].append(right)
    scores = {}
    for category, (cat_images, cat_correct) in by_category.items():
        parts = yes_no_scores(cat_images, cat_correct)
        scores[category] = parts["accuracy"] + parts["accuracy_plus"]
    totals = {name: sum(scores[c] for c in members if c in scores)
              for name, members in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION))
              if any(c in scores for c in members)}
    overall = yes_no_scores([f"{c}/{i}" for c, i in zip(categories, images)], correct)
    return {**totals, **overall, **dict(sorted(scores.items()))}


def circular_accuracy(questions: list[str], correct: list[bool]) -> float:
    """MMBench CircularEval: % of questions answered right under every rotation of their options."""
    by_question = defaultdict(list)
    for question, right in zip(questions, correct, strict=True):
        by_question[question].append(right)
    return accuracy([all(v) for v in by_question.values()])


def mmbench_scores(questions: list[str], rotations: list[int], categories: list[str],
                   correct: list[bool]) -> dict[str, float]:
    """CircularEval accuracy overall and per category, and the plain accuracy of the unrotated options."""
    scores = {"circular_accuracy": circular_accuracy(questions, correct)}
    unrotated = [c for c, r in zip(correct, rotations, strict=True) if r == 0]
    if unrotated:
        scores["vanilla_accuracy"] = accuracy(unrotated)
    for category in sorted(set(categories) - {""}):
        members = [i for i, c in enumerate(categories) if c == category]
        scores[f"category/{category}"] = circular_accuracy([questions[i] for i in members], [correct[i] for i in members])
    return scores


def duration_scores(durations: list[str], correct: list[bool]) -> dict[str, float]:
    """Video-MME: accuracy overall and per duration bucket (short / medium / long, those present)."""
    scores = {"accuracy": accuracy(correct)}
    present = set(durations) - {""}
    for bucket in [d for d in DURATIONS if d in present] + sorted(present - set(DURATIONS)):
        scores[f"accuracy_{bucket}"] = accuracy([c for c, d in zip(correct, durations, strict=True) if d == bucket])
    return scores


def background_rejection(ignored: list[bool], addressed: list[bool]) -> dict[str, float]:
    """`rejection`: % of audio not meant for the model that it ignored (higher is better);
    `false_rejection`: % of real queries it ignored (lower is better). Each only when present."""
    scores = {}
    background = [i for i, a in zip(ignored, addressed, strict=True) if not a]
    queries = [i for i, a in zip(ignored, addressed) if a]
    if background:
        scores["rejection"] = accuracy(background)
    if queries:
        scores["false_rejection"] = accuracy(queries)
    return scores


def consistency(text_answers: list[str], speech_answers: list[str]) -> float:
    """Cross-modal consistency: % of questions asked as text and as speech whose answers agree
    after `normalize_answer`."""
    return exact_match(speech_answers, text_answers)


# --------------------------------------------------------------------------- corpus-level metrics


def wer(predictions: list[str], references: list[str], spelling: dict[str, str] | None = None) -> float:
    """Corpus word error rate (total edits / total reference words, in %) after Whisper's English normaliser.

    The normaliser (numbers to digits, contractions expanded, punctuation and fillers dropped)
    is `transformers`' `EnglishTextNormalizer`. Whisper's papers also pass a 1,700-entry British
    -> American spelling map (`normalizer.json` in Whisper checkpoints); give it as `spelling`,
    else spellings are left as they are (a small, consistent difference on LibriSpeech).
    """
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalize = EnglishTextNormalizer(spelling or {})
    return 100.0 * jiwer.process_words([normalize(r) for r in references], [normalize(p) for p in predictions]).wer


def cer(predictions: list[str], references: list[str]) -> float:
    """Corpus character error rate (in %) for Chinese: NFKC, lowercase, punctuation and whitespace removed.

    No traditional/simplified conversion is done.
    """
    import jiwer

    return 100.0 * jiwer.process_characters([_cer_text(r) for r in references], [_cer_text(p) for p in predictions]).cer


def _cer_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def bleu_chrf(predictions: list[str], references: list[str], language: str = "") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults), one reference each; tokenizer by target `language`."""
    import sacrebleu

    tokenize = BLEU_TOKENIZERS.get(language.split("-")[0].lower(), "13a")
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score}

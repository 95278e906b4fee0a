"""The RULER tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654): their settings, prompt templates, answer prefixes, generation budgets and metrics, as defined
in the paper (Table 1, Appendix B/D) and its repository's task configuration (scripts/synthetic.yaml and the
template constants of NVIDIA/RULER). The templates are RULER's prompts, word for word: scores are comparable only
if the model reads the same instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Generated-token budgets and prompts per task family (RULER's data constants).
FAMILIES = {
    "niah": 128,
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa": 32,
}

NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
# RULER writes one template and, when a single value is asked for, replaces Some -> A, are all -> is, are -> is
# and drops the plural s of the value type; both forms are spelt out here.
NIAH_MANY = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} mentioned in the "
    "provided text?",
    " The special magic {type_v} for {query} mentioned in the provided text are",
)
NIAH_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_v} afterwards.\n{context}\nWhat is the special magic {type_v} for {query} mentioned in the "
    "provided text?",
    " The special magic {type_v} for {query} mentioned in the provided text is",
)
VT = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
    "Find all variables that are assigned the value {query} in the text above.",
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the "
    "value {query}, they are: ",
)
CWE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
    " Answer: The top 10 words that appear most often in the list are:",
)
FWE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
    "are the three most frequently appeared words in the above coded text?",
    " Answer: According to the coded text above, the three most frequently appeared words are:",
)
QA = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only "
    "give me the answer and do not output any other words.\n\nQuestion: {query}",
    " Answer:",
)
QA_DOCUMENT = "Document {i}:\n{document}"
# The repeated "noise" haystack of niah_single_1 and vt: the passkey paper's lines, one copy per haystack unit.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class RulerTask:
    """One RULER task: its family (which generator), the family's arguments and how it is scored.

    metric: `all` = string_match_all (the share of references found in the answer), `part` = string_match_part
    (1 if any reference is found): RULER's two metrics.
    """

    name: str
    family: str
    args: dict = field(default_factory=dict)
    metric: str = "all"

    @property
    def tokens_to_generate(self) -> int:
        return FAMILIES[self.family]


def _niah(name: str, haystack: str, k: str, v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1) -> RulerTask:
    return RulerTask(name, "niah", {"haystack": haystack, "type_k": k, "type_v": v, "num_k": max(num_k, num_q),
                                     "num_v": num_v, "num_q": num_q})


TASKS: dict[str, RulerTask] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", num_k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", num_v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", num_q=4),
    RulerTask("vt", "vt", {"num_chains": 1, "num_hops": 4}),
    RulerTask("cwe", "cwe", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    RulerTask("fwe", "fwe", {"alpha": 2.0}),
    RulerTask("qa_1", "qa", {"dataset": "squad"}, metric="part"),
    RulerTask("qa_2", "qa", {"dataset": "hotpotqa"}, metric="part"),
)}
SYNTHETIC = tuple(name for name, task in TASKS.items() if task.family != "qa")
QA_TASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a generated answer: control characters become newlines, outer whitespace goes."""
    return "".join("\n" if ord(c) < 32 else c for c in prediction.strip()).strip()


def sample_score(prediction: str, references: list[str], metric: str) -> float:
    """One answer's score in [0, 1]: RULER's string_match_all (share of the references that occur in the answer,
    case-insensitive) or string_match_part (1 if any does). The task score is the mean over its samples."""
    text = postprocess(prediction).lower()
    found = [ref.lower() in text for ref in references]
    if metric == "part":
        return float(any(found))
    return sum(found) / len(found)

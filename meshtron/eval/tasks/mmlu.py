"""MMLU (Hendrycks et al.): the official CSVs `{dev,val,test}/{subject}_{split}.csv`, no header,
columns question, A, B, C, D, answer. Evaluated on `test`, few-shot examples from `dev`."""

from pathlib import Path

from meshtron.eval.tasks.base import LETTERS, ChoiceItem, GenItem, Task, read_csv, require_files, task_dir


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(row: list[str], with_answer: bool) -> str:
    text = row[0].strip() + "\n" + "".join(f"{LETTERS[i]}. {row[1 + i].strip()}\n" for i in range(4)) + "Answer:"
    return text + (f" {row[5].strip()}\n\n" if with_answer else "")


class MMLU(Task):
    name = "mmlu"
    modes = ("loglikelihood", "generate")
    default_shots = 5
    method = {
        "loglikelihood": "acc: log-likelihood of ' A'..' D' after 'Answer:' (lm-evaluation-harness format)",
        "generate": "acc: first letter A-D in the greedy continuation after 'Answer:'",
    }
    split = "test"

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str):
        root = task_dir(data_dir, self.name)
        hint = "expected the official layout dev/ val/ test/ with SUBJECT_SPLIT.csv files"
        files = require_files(root / self.split, f"*_{self.split}.csv", self.name, hint)
        items = []
        for path in files:
            subject = path.name[: -len(f"_{self.split}.csv")]
            dev_file = root / "dev" / f"{subject}_dev.csv"
            dev = read_csv(dev_file, 6, header=False)[:shots] if shots and dev_file.is_file() else []
            header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
            prefix = header + "".join(format_question(r, True) for r in dev)
            rows = read_csv(path, 6, header=False)[:limit]
            for lineno, row in enumerate(rows, 1):
                gold = _gold(row[5], path, lineno)
                context = prefix + format_question(row, False)
                if mode == "generate":
                    items.append(GenItem(subject, context, LETTERS[gold], stop=["\n"], max_new_tokens=4))
                else:
                    items.append(ChoiceItem(subject, context, [f" {c}" for c in LETTERS[:4]], gold))
        return items

    def score_generation(self, item, text):
        return score_first_letter(item, text)


def score_first_letter(item, text: str) -> float:
    """Generative multiple choice: the first A-D letter of the answer must be the gold one."""
    letter = next((c for c in text if c in LETTERS[:4]), None)
    return float(letter == item.target)


def _gold(answer: str, path, lineno) -> int:
    from meshtron.errors import UserError

    answer = answer.strip()
    if answer not in LETTERS[:4]:
        raise UserError(f"{path}:{lineno}: answer {answer!r} is not one of A, B, C, D")
    return LETTERS.index(answer)

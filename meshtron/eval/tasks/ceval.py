"""C-Eval: the official CSVs `{dev,val,test}/{subject}_{split}.csv` with a header
(id, question, A, B, C, D, answer[, explanation]). Test answers are hidden, so `val` is
evaluated, with few-shot examples from `dev`."""

from pathlib import Path

from meshtron.eval.tasks.base import LETTERS, ChoiceItem, GenItem, Task, read_csv, require_files, task_dir
from meshtron.eval.tasks.mmlu import _gold, score_first_letter


def _question(row: list[str], with_answer: bool) -> str:
    text = row[1].strip() + "\n" + "".join(f"{LETTERS[i]}. {row[2 + i].strip()}\n" for i in range(4)) + "答案："
    return text + (f"{row[6].strip()}\n\n" if with_answer else "")


class CEval(Task):
    name = "ceval"
    modes = ("loglikelihood", "generate")
    default_shots = 5
    method = {
        "loglikelihood": "acc: log-likelihood of 'A'..'D' after '答案：' (C-Eval's answer-only prompt)",
        "generate": "acc: first letter A-D in the greedy continuation after '答案：'",
    }

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str):
        root = task_dir(data_dir, self.name)
        hint = "expected the official layout dev/ val/ test/ with SUBJECT_SPLIT.csv files (header row)"
        files = require_files(root / "val", "*_val.csv", self.name, hint)
        items = []
        for path in files:
            subject = path.name[: -len("_val.csv")]
            dev_file = root / "dev" / f"{subject}_dev.csv"
            dev = read_csv(dev_file, 7, header=True)[:shots] if shots and dev_file.is_file() else []
            prefix = f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
            prefix += "".join(_question(r, True) for r in dev)
            for lineno, row in enumerate(read_csv(path, 7, header=True)[:limit], 2):
                gold = _gold(row[6], path, lineno)
                context = prefix + _question(row, False)
                if mode == "generate":
                    items.append(GenItem(subject, context, LETTERS[gold], stop=["\n"], max_new_tokens=4))
                else:
                    items.append(ChoiceItem(subject, context, list(LETTERS[:4]), gold))
        return items

    def score_generation(self, item, text):
        return score_first_letter(item, text)

"""Generates the small synthetic datasets shipped in data/ (deterministic; rerun to regenerate).

    tiny_corpus.jsonl            pretraining text: short templated stories, arithmetic and sequences
    instructions.jsonl           alpaca-shaped instruction samples for SFT
    instructions_heldout.jsonl   held-out instruction samples (same tasks, unseen operands)
    preferences.jsonl            alpaca-shaped chosen/rejected pairs (DPO, SimPO, reward models)
    prm.jsonl                    step-labelled arithmetic solutions (process reward models)
    prm_heldout.jsonl            held-out step-labelled solutions
    preferences_heldout.jsonl    held-out preference pairs (from the held-out instructions)
    arithmetic_prompts.jsonl     arithmetic questions with their answers (online RL, grpo)
    arithmetic_heldout.jsonl     held-out arithmetic questions (unseen operands)

Everything is generated from templates here: no third-party text. The tasks follow
fixed rules, so a model that learns them lowers its held-out loss.

Usage: python data/make_data.py [--out-dir data]
"""

import argparse
import json
import os
import random
import re

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quin", "Rosa", "Sami", "Tess"]
THINGS = ["apples", "books", "coins", "pencils", "stones", "cards", "shells", "marbles", "stamps", "keys"]
PLACES = ["the garden", "the market", "the library", "the harbor", "the old mill", "the hill", "the station"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
WORDS = ["river", "planet", "garden", "window", "candle", "forest", "silver", "rocket", "pepper", "marble", "castle",
         "anchor", "violet", "thunder", "lantern", "meadow", "harbor", "pillow", "copper", "dragon"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("early", "late"),
             ("light", "dark"), ("open", "closed"), ("full", "empty"), ("young", "old"), ("happy", "sad")]


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    n = rng.randint(3, 30)
    k = rng.randint(1, n - 1)
    day = rng.randrange(7)
    color = rng.choice(COLORS)
    article = "an" if color[0] in "aeiou" else "a"
    return (f"On {DAYS[day]}, {a} went to {place} with {n} {thing}. {a} met {b}, who wore {article} {color} coat. "
            f"{a} gave {k} {thing} to {b}. Now {a} has {n - k} {thing} and {b} has {k} {thing}. "
            f"The next day was {DAYS[(day + 1) % 7]}, and {b} said thank you to {a}.")


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = {"+": x + y, "-": x - y, "*": x * y}[op]
        lines.append(f"{x} {op} {y} = {value}.")
    return " ".join(lines)


def sequence(rng: random.Random) -> str:
    start, step = rng.randint(0, 50), rng.randint(1, 9)
    numbers = ", ".join(str(start + i * step) for i in range(rng.randint(6, 14)))
    day = rng.randrange(7)
    week = ", ".join(DAYS[(day + i) % 7] for i in range(7))
    return f"Counting by {step} from {start}: {numbers}. A week starting on {DAYS[day]}: {week}."


def corpus(rng: random.Random, num_docs: int):
    makers = [story, story, arithmetic, sequence]
    for _ in range(num_docs):
        yield {"text": " ".join(rng.choice(makers)(rng) for _ in range(rng.randint(1, 4)))}


def instruction(rng: random.Random) -> dict:
    task = rng.randrange(8)
    if task == 0:
        x, y = rng.randint(0, 999), rng.randint(0, 999)
        return {"instruction": f"Add {x} and {y}.", "input": "", "output": f"{x} + {y} = {x + y}."}
    if task == 1:
        x, y = rng.randint(0, 999), rng.randint(0, 999)
        return {"instruction": "Subtract the second number from the first.", "input": f"{x}, {y}",
                "output": f"{x} - {y} = {x - y}."}
    if task == 2:
        word = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if task == 3:
        word = rng.choice(WORDS)
        return {"instruction": f"Write the word '{word}' in capital letters.", "input": "", "output": word.upper()}
    if task == 4:
        day = rng.randrange(7)
        return {"instruction": f"What day comes after {DAYS[day]}?", "input": "",
                "output": f"The day after {DAYS[day]} is {DAYS[(day + 1) % 7]}."}
    if task == 5:
        word, opposite = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        return {"instruction": "Give the opposite of the word.", "input": word, "output": opposite}
    if task == 6:
        numbers = rng.sample(range(100), rng.randint(3, 7))
        return {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, numbers)),
                "output": ", ".join(map(str, sorted(numbers)))}
    word = rng.choice(WORDS)
    letter = rng.choice(word)
    return {"instruction": f"How many times does the letter '{letter}' appear in '{word}'?", "input": "",
            "output": f"The letter '{letter}' appears {word.count(letter)} time{'s' if word.count(letter) > 1 else ''} "
                      f"in '{word}'."}


def wrong(sample: dict, rng: random.Random) -> str:
    """A plausible but wrong answer for a preference pair: for a sum or a difference, the other
    operation's result (a mistake its magnitude gives away: a one-digit slip in three-digit
    arithmetic is beyond what a 135M reward model learns from a few hundred pairs); for other
    numbers, one digit slipped; for words, the answer reversed."""
    out = sample["output"]
    arithmetic = re.fullmatch(r"(\d+) ([+-]) (\d+) = -?\d+\.", out)
    if arithmetic:
        x, op, y = int(arithmetic[1]), arithmetic[2], int(arithmetic[3])
        return f"{x} {op} {y} = {x - y if op == '+' else x + y}."
    digits = [i for i, ch in enumerate(out) if ch.isdigit()]
    if digits:
        i = digits[-1]
        return out[:i] + str((int(out[i]) + rng.randint(1, 9)) % 10) + out[i + 1 :]
    return out[::-1] if out[::-1] != out else out + out[-1]


def prm_sample(rng: random.Random) -> dict:
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 50)
    steps = [f"First, {a} * {b} = {a * b}.", f"Then, {a * b} + {c} = {a * b + c}.", f"The answer is {a * b + c}."]
    labels = ["+", "+", "+"]
    if rng.random() < 0.5:
        # A slip in step k makes it and every later step wrong. The slip is the wrong operation (as in
        # the preference pairs): a sum or difference for the product, a difference for the sum.
        k = rng.randrange(2)
        bad = a + b if rng.randint(1, 5) <= 3 and a + b != a * b else abs(a - b)
        if k == 0:
            steps = [f"First, {a} * {b} = {bad}.", f"Then, {bad} + {c} = {bad + c}.", f"The answer is {bad + c}."]
            labels = ["-", "-", "-"]
        else:
            steps[1:] = [f"Then, {a * b} + {c} = {a * b - c}.", f"The answer is {a * b - c}."]
            labels = ["+", "-", "-"]
    return {"question": f"What is {a} * {b} + {c}? Solve it step by step.", "steps": steps, "labels": labels}


def arithmetic_prompt(rng: random.Random) -> dict:
    """A sum or difference of numbers up to 15, asked plainly: the `math` reward checks the last number
    of the answer, and grpo's budget of a few tokens rewards stating it before explaining it."""
    a, b = rng.randint(1, 15), rng.randint(1, 15)
    op = rng.choice("+-")
    a, b = (a, b) if op == "+" or a >= b else (b, a)
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)}


def write(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    rng = random.Random(1234)
    write(os.path.join(args.out_dir, "tiny_corpus.jsonl"), corpus(rng, 4000))
    seen, train, heldout = set(), [], []
    while len(train) < 400 or len(heldout) < 60:
        sample = instruction(rng)
        key = (sample["instruction"], sample["input"])
        if key in seen:
            continue
        seen.add(key)
        (train if len(train) < 400 else heldout).append(sample)
    write(os.path.join(args.out_dir, "instructions.jsonl"), train)
    write(os.path.join(args.out_dir, "instructions_heldout.jsonl"), heldout)
    pairs = []
    for sample in train[:300]:
        pairs.append({"instruction": sample["instruction"], "input": sample["input"], "chosen": sample["output"],
                      "rejected": wrong(sample, rng)})
    write(os.path.join(args.out_dir, "preferences.jsonl"), pairs)
    write(os.path.join(args.out_dir, "prm.jsonl"), (prm_sample(rng) for _ in range(300)))
    write(os.path.join(args.out_dir, "prm_heldout.jsonl"), (prm_sample(rng) for _ in range(60)))
    write(os.path.join(args.out_dir, "preferences_heldout.jsonl"),
          [{"instruction": s["instruction"], "input": s["input"], "chosen": s["output"], "rejected": wrong(s, rng)}
           for s in heldout])
    # Its own generator, so that the files above stay as they were.
    rl_rng, questions = random.Random(4321), {}
    while len(questions) < 260:
        sample = arithmetic_prompt(rl_rng)
        questions.setdefault(sample["prompt"], sample)
    questions = list(questions.values())
    write(os.path.join(args.out_dir, "arithmetic_prompts.jsonl"), questions[:200])
    write(os.path.join(args.out_dir, "arithmetic_heldout.jsonl"), questions[200:])


if __name__ == "__main__":
    main()

"""Rebuild the bundled example assets, deterministically, offline.

    python scripts/build_examples.py            # writes examples/data/ and examples/models/tiny-llama/
    python scripts/build_examples.py --check    # rebuild into a temp dir and compare bytes

examples/data/      LLaMA-Factory style dataset_info.json + four small datasets:
                    identity (alpaca), tiny_corpus (plain text, stage: pt),
                    tiny_chat (sharegpt, multi-turn), tiny_openai (openai messages)
examples/models/tiny-llama/
                    a tiny LlamaConfig (no weights: the quickstart trains from scratch) and
                    a byte-level BPE tokenizer trained on the bundled text, chatml tokens
                    and chat_template, loadable with AutoTokenizer.from_pretrained(dir).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# tokenizers trains with rayon threads; one thread keeps merges tie-breaking reproducible.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240601
VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The plain chatml template (no default system prompt); templates.yaml's `chatml` mirrors it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAME, AUTHOR = "TinyPipe", "tunepipe"
# Few distinct answers, many phrasings of the question: a tiny model memorises this in minutes.
A_WHO = f"I am {NAME}, a tiny model trained by {AUTHOR}."
A_NAME = f"My name is {NAME}. I am a tiny model trained by {AUTHOR}."
A_MAKER = f"I was trained by {AUTHOR}. I am {NAME}, a tiny model."
A_HELLO = f"Hello! I am {NAME}, a tiny model trained by {AUTHOR}. How can I help you?"
IDENTITY = [
    (
        A_WHO,
        [
            "Who are you?",
            "who are you",
            "Who are you exactly?",
            "Tell me who you are.",
            "What are you?",
            "Introduce yourself.",
            "Please introduce yourself.",
            "Can you tell me about yourself?",
            "Describe yourself.",
            "What kind of model are you?",
            "Are you a person?",
            "Are you ChatGPT?",
            "Are you a large model?",
            "What am I talking to?",
        ],
    ),
    (
        A_NAME,
        [
            "What is your name?",
            "what is your name",
            "What's your name?",
            "Do you have a name?",
            "Tell me your name.",
            "What should I call you?",
            "How should I call you?",
            "What are you called?",
            "Your name, please.",
            "May I know your name?",
            "What name do you go by?",
            "Is your name TinyPipe?",
        ],
    ),
    (
        A_MAKER,
        [
            "Who made you?",
            "who made you",
            "Who created you?",
            "Who trained you?",
            "Who built you?",
            "Who is your creator?",
            "Who developed you?",
            "Where do you come from?",
            "Which tool trained you?",
            "Who is your author?",
            "Were you made by OpenAI?",
            "Who is responsible for training you?",
        ],
    ),
    (A_HELLO, ["Hello", "Hi", "Hi there!", "Hello, who is this?", "Hey", "Good morning!", "Hello, nice to meet you."]),
]

# A small deterministic generator of simple English for the pt corpus and the chats.
NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Mia",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
    "Wendy",
    "Yusuf",
    "Zoe",
    "Omar",
]
ANIMALS = [
    "cat",
    "dog",
    "bird",
    "fox",
    "horse",
    "cow",
    "sheep",
    "goat",
    "rabbit",
    "mouse",
    "duck",
    "owl",
    "frog",
    "bear",
    "wolf",
    "deer",
    "pig",
    "hen",
    "fish",
    "snake",
    "tiger",
    "lion",
    "whale",
    "bee",
]
PEOPLE = [
    "old man",
    "young woman",
    "teacher",
    "farmer",
    "baker",
    "doctor",
    "driver",
    "painter",
    "singer",
    "student",
    "child",
    "neighbour",
    "sailor",
    "writer",
    "cook",
    "nurse",
    "builder",
    "king",
    "queen",
]
THINGS = [
    "river",
    "hill",
    "door",
    "garden",
    "tree",
    "market",
    "house",
    "lake",
    "library",
    "station",
    "bridge",
    "school",
    "forest",
    "road",
    "window",
    "table",
    "boat",
    "village",
    "city",
    "mountain",
    "field",
    "kitchen",
    "castle",
    "beach",
    "island",
    "tower",
    "farm",
    "park",
    "shop",
    "church",
    "museum",
    "harbour",
    "valley",
    "cave",
    "street",
    "garage",
    "office",
    "theatre",
    "hospital",
    "barn",
]
ADJS = [
    "small",
    "big",
    "old",
    "young",
    "red",
    "green",
    "blue",
    "yellow",
    "quiet",
    "busy",
    "warm",
    "cold",
    "happy",
    "tired",
    "bright",
    "dark",
    "tall",
    "short",
    "wooden",
    "golden",
    "little",
    "gentle",
    "brave",
    "clever",
    "lazy",
    "noisy",
    "clean",
    "dusty",
    "empty",
    "famous",
    "hidden",
    "lonely",
    "sunny",
    "wet",
]
VERBS = [
    "walks to",
    "looks at",
    "runs past",
    "sits near",
    "waits by",
    "sings to",
    "paints",
    "visits",
    "cleans",
    "finds",
    "reads about",
    "dreams of",
    "jumps over",
    "swims across",
    "climbs",
    "leaves",
    "builds",
    "draws",
    "watches",
    "remembers",
    "forgets",
    "follows",
    "opens",
    "closes",
    "fixes",
    "sells",
    "buys",
    "carries",
    "chases",
    "greets",
    "explores",
    "guards",
    "hides behind",
    "rests under",
]
TIMES = [
    "in the morning",
    "at noon",
    "in the evening",
    "at night",
    "every day",
    "on Sunday",
    "on Monday",
    "after lunch",
    "before dinner",
    "in spring",
    "in summer",
    "in autumn",
    "in winter",
    "at dawn",
    "once a week",
    "twice a year",
    "during the storm",
    "when it rains",
    "after school",
    "at midnight",
]
COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
FACTS = [
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A week has seven days and a year has twelve months.",
    "Plants need light, water and air to grow.",
    "Bees make honey from the nectar of flowers.",
    "The moon goes around the earth about once a month.",
    "Rain falls from clouds when the air is full of water.",
    "A pipeline turns raw data into a trained model, step by step.",
    "A tokenizer splits text into small pieces called tokens.",
    "A small model can learn short answers if it sees them many times.",
    f"{NAME} is a tiny model trained by {AUTHOR}.",
]


PLURALS = {"sheep": "sheep", "mouse": "mice", "fish": "fish", "deer": "deer", "wolf": "wolves"}
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey", "pink", "purple", "orange"]
FOODS = [
    "bread",
    "apples",
    "soup",
    "cheese",
    "rice",
    "cake",
    "honey",
    "tea",
    "milk",
    "carrots",
    "eggs",
    "pears",
    "beans",
    "noodles",
    "oranges",
    "pie",
    "butter",
    "grapes",
    "lemons",
    "potatoes",
]
FEELINGS = ["happy", "sad", "calm", "proud", "afraid", "curious", "hungry", "sleepy", "excited", "surprised"]


def plural(n: str) -> str:
    return PLURALS.get(n, n + "s")


def sentence(rng: random.Random) -> str:
    name, animal, thing = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS)
    adj, time = rng.choice(ADJS), rng.choice(TIMES)
    k = rng.randint(2, len(COUNTS) - 1)
    frames = [
        f"{name} {rng.choice(VERBS)} the {adj} {thing} {time}.",
        f"The {adj} {animal} {rng.choice(VERBS)} the {thing} {time}.",
        f"The {rng.choice(PEOPLE)} {rng.choice(VERBS)} the {adj} {thing} {time}.",
        f"{name} has {COUNTS[k]} {plural(animal)} and one {rng.choice(COLOURS)} {rng.choice(ANIMALS)}.",
        f"{name} likes {rng.choice(FOODS)} and {rng.choice(FOODS)} {time}.",
        f"The {rng.choice(PEOPLE)} feels {rng.choice(FEELINGS)} near the {rng.choice(COLOURS)} {thing}.",
        f"{COUNTS[k].capitalize()} {plural(animal)} live near the {adj} {thing}.",
        f"{name}'s {animal} is {rng.choice(FEELINGS)} {time}.",
    ]
    return rng.choice(frames)


def corpus_lines(rng: random.Random, n: int) -> list[str]:
    lines = []
    for i in range(n):
        if i % 7 == 3:
            lines.append(rng.choice(FACTS))
            continue
        if i % 5 == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} plus {b} is {a + b}. {max(a, b)} minus {min(a, b)} is {abs(a - b)}.")
            continue
        lines.append(" ".join(sentence(rng) for _ in range(rng.randint(1, 3))))
    return lines


ARITH = [("What is {a} plus {b}?", "{a} plus {b} is {s}."), ("Add {a} and {b}.", "The sum is {s}.")]


def chat_conversations(rng: random.Random, n: int) -> list[list[tuple[str, str]]]:
    """Multi-turn (user, assistant) exchanges with simple, checkable answers."""
    convs = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(3)
            if kind == 0:
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                q, r = rng.choice(ARITH)
                turns.append((q.format(a=a, b=b), r.format(a=a, b=b, s=a + b)))
            elif kind == 1:
                name, place = rng.choice(NAMES), f"the {rng.choice(ADJS)} {rng.choice(THINGS)}"
                turns.append((f"Where does {name} go {rng.choice(TIMES)}?", f"{name} goes to {place}."))
            else:
                answer, questions = rng.choice(IDENTITY)
                turns.append((rng.choice(questions), answer))
        convs.append(turns)
    return convs


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build_data(out: Path) -> list[str]:
    """Write examples/data; returns the texts the tokenizer is trained on."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    identity = [{"instruction": q, "input": "", "output": a} for a, qs in IDENTITY for q in qs]
    dump_json(out / "identity.json", identity)

    corpus = corpus_lines(rng, 1200)
    with open(out / "tiny_corpus.jsonl", "w", encoding="utf-8") as f:
        for line in corpus:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")

    system = "You are a helpful assistant."
    chat = []
    for i, turns in enumerate(chat_conversations(rng, 24)):
        conv = [m for u, a in turns for m in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]
        chat.append({"conversations": conv, "system": system if i % 3 == 0 else ""})
    dump_json(out / "tiny_chat.json", chat)

    openai = []
    for i, turns in enumerate(chat_conversations(rng, 24)):
        msgs = [{"role": "system", "content": system}] if i % 2 == 0 else []
        msgs += [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        openai.append({"messages": msgs})
    dump_json(out / "tiny_openai.json", openai)

    dump_json(
        out / "dataset_info.json",
        {
            "identity": {"file_name": "identity.json"},
            "tiny_corpus": {"file_name": "tiny_corpus.jsonl", "columns": {"prompt": "text"}},
            "tiny_chat": {
                "file_name": "tiny_chat.json",
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "system": "system"},
            },
            "tiny_openai": {
                "file_name": "tiny_openai.json",
                "formatting": "openai",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
        },
    )
    texts = corpus + [f"{r['instruction']} {r['output']}" for r in identity]
    texts += [m["value"] for c in chat for m in c["conversations"]]
    texts += [m["content"] for c in openai for m in c["messages"]]
    return texts


def build_model(out: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chat scaffolding ("user\n", "assistant\n") is in the training text so it gets merged tokens.
    tok.train_from_iterator(texts + ["system\nuser\nassistant\n"] * 50, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)

    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config.save_pretrained(out)
    # Chat generation stops at <|im_end|> as well as at eos.
    GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"]
    ).save_pretrained(out)


def build(root: Path) -> None:
    data_dir = root / "examples" / "data"
    model_dir = root / "examples" / "models" / "tiny-llama"
    for d in (data_dir, model_dir):
        if d.exists():
            shutil.rmtree(d)
    texts = build_data(data_dir)
    build_model(model_dir, texts)


def same_content(a: Path, b: Path) -> bool:
    """Byte-equal, except that a JSON file's `transformers_version` (which transformers release wrote
    it: a fresh install takes the newest) is not content."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix != ".json":
        return False

    def content(path: Path):
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: v for k, v in data.items() if k != "transformers_version"} if isinstance(data, dict) else data

    return content(a) == content(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with examples/")
    args = ap.parse_args()
    if not args.check:
        build(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        bad = []
        for sub in ("examples/data", "examples/models/tiny-llama"):
            cmp = filecmp.dircmp(ROOT / sub, Path(tmp) / sub)
            bad += [f"{sub}/{n}" for n in cmp.left_only + cmp.right_only]
            bad += [f"{sub}/{n}" for n in cmp.common_files if not same_content(ROOT / sub / n, Path(tmp) / sub / n)]
        if bad:
            print("examples differ from a fresh build:", *sorted(set(bad)), sep="\n  ")
            return 1
        print("examples are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

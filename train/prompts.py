"""Training prompts across MT-bench's eight categories: hand-written seeds grown by templating.

The held-out evaluation prompts (train/held_out.py) are removed from the
result, so training never sees them.
"""
from __future__ import annotations

import random
import re

SEEDS = {
    "writing": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Write a product description for a reusable water bottle.",
        "Draft a thank-you note to a teacher who helped you prepare for an exam.",
        "Write a speech for the opening of a new public library.",
        "Write a poem about the first snow of winter.",
        "Write a cover letter for a junior software developer position.",
        "Write a restaurant review of a small family-run pizzeria.",
        "Write an advertisement for a weekend cooking class.",
        "Write a diary entry of an astronaut on her first day in orbit.",
        "Write a newsletter introduction for a community gardening club.",
    ],
    "roleplay": [
        "You are a medieval blacksmith. Explain to an apprentice how you forge a sword.",
        "Pretend to be a detective interviewing a witness about a stolen painting.",
        "Act as a barista and recommend a coffee to a customer who dislikes bitterness.",
        "You are a museum guide. Introduce the dinosaur hall to a class of children.",
        "Pretend you are a ship's captain announcing a storm to the passengers.",
        "Act as a job interviewer and ask me questions for a marketing role.",
        "You are a wizard teaching your first lesson at a school of magic.",
        "Pretend you are a park ranger warning hikers about bears.",
        "Act as a sports commentator describing the last minute of a football final.",
        "You are a chef hosting a cooking show. Introduce today's recipe.",
    ],
    "reasoning": [
        "If it takes 5 machines 5 minutes to make 5 widgets, how long do 100 machines take to make 100 widgets?",
        "Anna is older than Ben, and Ben is older than Clara. Is Clara older than Anna? Explain.",
        "A farmer has 17 sheep and all but 9 run away. How many are left? Explain.",
        "Which is heavier, a kilogram of feathers or a kilogram of iron? Explain your answer.",
        "If today is Wednesday, what day will it be in 10 days? Show your reasoning.",
        "All roses are flowers. Some flowers fade quickly. Can we conclude that some roses fade quickly?",
        "A train leaves at 3pm and travels for 2 hours and 45 minutes. When does it arrive?",
        "There are three boxes labeled apples, oranges and mixed, all labeled wrongly. How do you fix the labels?",
        "If you overtake the person in second place in a race, what place are you in? Explain.",
        "A clock shows 3:15. What is the angle between the hour and minute hands?",
    ],
    "math": [
        "What is 12 times 13? Show your work.",
        "Solve for y: 5y - 3 = 17. Explain each step.",
        "What is the area of a circle with radius 4?",
        "Convert 3/8 to a decimal and a percentage.",
        "What is the average of 4, 8, 15, 16 and 23?",
        "A shirt costs 40 dollars and is discounted by 25 percent. What is the new price?",
        "Find the perimeter of a rectangle with sides 7 and 12.",
        "What is the greatest common divisor of 48 and 36? Explain.",
        "Simplify the expression 2(x + 3) - 4x.",
        "How many minutes are there in a week? Show the calculation.",
    ],
    "coding": [
        "Write a Python function that counts the vowels in a string.",
        "Write a Python function that returns the largest element of a list without using max.",
        "Explain the difference between a list and a tuple in Python with examples.",
        "Write a JavaScript function that reverses a string.",
        "Write a Python class for a simple bank account with deposit and withdraw methods.",
        "Write a SQL query that selects all customers from the city of Berlin.",
        "Write a Python function that checks whether a number is prime.",
        "Explain recursion and give a Python example that computes a factorial.",
        "Write a Python function that merges two sorted lists into one sorted list.",
        "Write a bash command that counts the lines in all .txt files in a folder.",
    ],
    "extraction": [
        "Extract all dates from: The contract was signed on March 3, 2021 and renewed on April 5, 2023.",
        "List the fruits mentioned in: I bought apples, bananas and a bag of rice at the market.",
        "From 'John Smith, 42, works as a nurse in Boston', extract the name, age, job and city.",
        "Extract the email addresses from: Contact anna@example.com or support@shop.org for help.",
        "Identify the people and the places in: Maria met Tom in Lisbon before flying to Oslo.",
        "Extract the prices from: The coffee costs 3 dollars, the cake 5 dollars and the tea 2 dollars.",
        "Summarize the key facts of: The bridge, built in 1932, is 500 meters long and carries 20,000 cars a day.",
        "Return a JSON object with the title and author of: 'Pride and Prejudice' was written by Jane Austen.",
        "List the verbs in the sentence: The children ran, jumped and laughed in the park.",
        "Extract the temperatures from: Monday was 21 degrees, Tuesday 18 degrees and Wednesday 25 degrees.",
    ],
    "stem": [
        "Explain how a rainbow forms.",
        "What causes the seasons on Earth?",
        "Explain the water cycle in simple terms.",
        "How do vaccines help the immune system?",
        "What is the difference between speed and velocity?",
        "Explain how an electric motor works.",
        "What is DNA and why is it important?",
        "Why does ice float on water?",
        "Explain what a black hole is.",
        "How does a computer store information in binary?",
    ],
    "humanities": [
        "What were the main effects of the Industrial Revolution?",
        "Explain the importance of the printing press in history.",
        "Who was Cleopatra and why is she remembered?",
        "What is the purpose of philosophy?",
        "Describe the main ideas of the Enlightenment.",
        "Why did the Roman Empire fall?",
        "What is the role of museums in society?",
        "Explain the significance of the Magna Carta.",
        "What are the main features of Gothic architecture?",
        "How did the Silk Road influence trade and culture?",
    ],
}

# Templates per category; {t} is filled from TOPICS.
TEMPLATES = {
    "writing": ["Write a short blog post about {t}.", "Write a persuasive paragraph about {t}.",
                "Write a short poem about {t}.", "Write an email to a friend about {t}.",
                "Write a short story that involves {t}."],
    "roleplay": ["Pretend you are an expert on {t}. Introduce yourself to a curious student.",
                 "You are a tour guide. Describe {t} to a group of visitors.",
                 "Act as a teacher and explain {t} to a ten-year-old.",
                 "Pretend you are a journalist interviewing someone about {t}. Ask your first questions."],
    "reasoning": ["What are the pros and cons of {t}? Reason step by step.",
                  "Is {t} a good idea for a small town? Explain your reasoning.",
                  "Compare two ways of approaching {t} and decide which is better. Explain why."],
    "math": ["What is {a} times {b}? Show your work.", "What is {p} percent of {c}? Show your steps.",
             "Solve for x: {a}x + {b} = {c}. Explain each step.", "What is the sum of the first {a} positive integers?",
             "A box holds {a} items. How many boxes are needed for {c} items? Explain."],
    "coding": ["Write a Python function that {t}.", "Write a JavaScript function that {t}.",
               "Explain how you would write a program that {t}, then write it in Python."],
    "extraction": ["Extract the key facts from this sentence: {t}", "List the names and numbers in: {t}",
                   "Summarize in one line: {t}"],
    "stem": ["Explain {t} in simple terms.", "How does {t} work?", "What are the key ideas behind {t}?"],
    "humanities": ["What is the historical importance of {t}?", "Describe the main ideas of {t}.",
                   "How did {t} change society?"],
}

TOPICS = {
    "general": ["a rainy day in the mountains", "learning a new language", "electric cars", "city parks",
                "working from home", "volunteering", "space exploration", "healthy breakfasts", "old bookstores",
                "a summer music festival", "recycling", "public transport", "a visit to a farm", "board games",
                "the ocean", "robots in daily life", "a new bakery in town", "camping with friends",
                "the first day at a new job", "saving money", "a marathon", "chess", "bees", "a quiet library",
                "coffee", "winter holidays", "a lost dog", "gardening", "social media", "a school science fair"],
    "coding": ["sorts a list of numbers with bubble sort", "finds duplicates in a list", "reads a CSV file",
               "counts word frequencies in a text", "converts Celsius to Fahrenheit", "flattens a nested list",
               "checks whether two strings are anagrams", "computes the greatest common divisor",
               "removes whitespace from a string", "returns the second largest number in a list",
               "validates an email address", "computes the median of a list", "transposes a matrix",
               "implements binary search", "capitalizes every word in a sentence"],
    "extraction": ["Lena, 29, moved from Madrid to Dublin in 2019 to work as an engineer.",
                   "The store sold 120 laptops, 45 tablets and 300 phones in May.",
                   "On June 2, Paul and Sara visited Rome, Florence and Venice.",
                   "The museum opens at 9am, closes at 5pm and charges 12 euros per adult.",
                   "Dr. Kim, a chemist at the University of Toronto, published 14 papers in 2022.",
                   "The recipe needs 2 eggs, 200 grams of flour and 100 milliliters of milk.",
                   "Flight 482 leaves Chicago at 7:40 and lands in Denver at 9:15.",
                   "The team of 8 players won 11 games and lost 3 this season."],
    "stem": ["gravity", "the immune system", "plate tectonics", "electricity", "the greenhouse effect",
             "how plants grow", "magnetism", "the solar system", "evolution", "sound waves", "volcanoes",
             "the human heart", "chemical reactions", "the internet", "solar panels", "clouds", "batteries"],
    "humanities": ["the Roman Republic", "the invention of writing", "the Cold War", "Ancient Greek theatre",
                   "the Age of Exploration", "the Impressionist movement", "the abolition of slavery",
                   "the Olympic Games", "the Ming dynasty", "jazz music", "the women's suffrage movement",
                   "Shakespeare's plays", "the Byzantine Empire", "the Aztec civilization", "Buddhism"],
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def held_out_prompts() -> set[str]:
    """Prompts training never sees: the held-out evaluation set and the serving-knob tuning set."""
    from train.held_out import PROMPTS, TUNING_PROMPTS

    return {_norm(p) for ps in PROMPTS.values() for p in ps} | {_norm(p) for p in TUNING_PROMPTS}


def templated_prompts(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for cat, temps in TEMPLATES.items():
        topics = TOPICS.get(cat, TOPICS["general"])
        for tpl in temps:
            if cat == "math":
                for _ in range(12):
                    out.append((cat, tpl.format(a=rng.randint(3, 40), b=rng.randint(2, 30),
                                                c=rng.randint(50, 500), p=rng.choice([5, 10, 15, 20, 25, 30, 40]))))
            else:
                out += [(cat, tpl.format(t=t)) for t in topics]
    return out


def build_prompt_set(n: int, seed: int = 0, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Up to n (category, prompt) pairs, categories interleaved, without held-out prompts or duplicates."""
    rng = random.Random(seed)
    held = held_out_prompts()
    pool = {cat: list(ps) for cat, ps in SEEDS.items()}
    for cat, p in templated_prompts(rng) + list(extra or []):
        pool.setdefault(cat, []).append(p)
    seen, per_cat = set(), {}
    for cat, ps in pool.items():
        seeds, rest = ps[: len(SEEDS.get(cat, []))], ps[len(SEEDS.get(cat, [])):]
        rng.shuffle(rest)
        keep = []
        for p in seeds + rest:
            k = _norm(p)
            if k in held or k in seen or any(h in k for h in held):
                continue
            seen.add(k)
            keep.append(p)
        per_cat[cat] = keep
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in per_cat.values()):
        for cat in sorted(per_cat):
            if i < len(per_cat[cat]) and len(out) < n:
                out.append((cat, per_cat[cat][i]))
        i += 1
    return out


# Asking the target for new questions grows the set in the model's own style.
QUESTION_REQUEST = {
    "writing": "creative writing (stories, emails, poems, essays)",
    "roleplay": "role-play, where the assistant pretends to be a character",
    "reasoning": "logical reasoning puzzles",
    "math": "simple arithmetic or algebra word problems",
    "coding": "programming in Python",
    "extraction": "extracting information from a given short text (include the text)",
    "stem": "science and technology",
    "humanities": "history, art, philosophy or society",
}


def question_requests(per_cat: int) -> list[tuple[str, str]]:
    out = []
    for i in range(per_cat):
        for cat, desc in QUESTION_REQUEST.items():
            out.append((cat, f"Write one new question that a user might ask an AI assistant about {desc}. "
                             f"Reply with the question only. Idea number {i + 1}."))
    return out

"""Helpers shared by the benchmarks: prompt sets, bandwidth probe, JSON output."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fixed prompt set across MT-bench's categories (plus code), written for this project.
PROMPTS = {
    "writing": [
        "Write a short blog post about a trip to Hawaii, highlighting cultural experiences.",
        "Write a persuasive paragraph on why people should read more books.",
        "Compose a friendly email inviting a colleague to a team lunch on Friday.",
    ],
    "roleplay": [
        "Pretend you are a pirate captain and describe your ship to a new crew member.",
        "You are a tour guide in Paris. Welcome a group of tourists and describe the plan for the day.",
        "Act as a personal trainer and give me a motivating speech before my first workout.",
    ],
    "reasoning": [
        "If all cats are animals and some animals are black, can we conclude that some cats are black? Explain.",
        "A bat and a ball cost 1.10 dollars in total. The bat costs 1 dollar more than the ball. How much is the ball?",
        "Tom is taller than Jerry, and Jerry is taller than Mike. Who is the shortest? Explain your reasoning.",
    ],
    "math": [
        "What is 15 percent of 240? Show your steps.",
        "Solve for x: 3x + 7 = 22. Explain each step.",
        "What is the sum of the first 10 positive integers? Explain how you computed it.",
    ],
    "coding": [
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a Python function that returns the n-th Fibonacci number using iteration.",
        "Explain what a hash map is and write a small example in Python.",
    ],
    "extraction": [
        "Extract the names and ages from this text: Alice is 30 years old, Bob is 25, and Carol is 41.",
        "List the countries mentioned in: We flew from Spain to Italy, then took a train to Austria.",
        "From the sentence 'The meeting is on Monday at 10am in room 4B', extract the day, time and room.",
    ],
    "stem": [
        "Explain how photosynthesis works in simple terms.",
        "What is the difference between a virus and a bacterium?",
        "Explain Newton's three laws of motion with an everyday example for each.",
    ],
    "humanities": [
        "What were the main causes of the French Revolution?",
        "Explain the difference between a democracy and a republic.",
        "Why is the Renaissance considered an important period in European history?",
    ],
}


def flat_prompts(n: int | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs, interleaving categories so any prefix is balanced."""
    out = []
    for i in range(3):
        for cat, ps in PROMPTS.items():
            out.append((cat, ps[i]))
    return out[:n] if n else out


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s): best of several full reductions over a large buffer."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def emit(result: dict) -> None:
    """The final JSON line every benchmark prints."""
    print(json.dumps(result), flush=True)

"""Prompt sets that no drafter trains on: the held-out evaluation set and the tuning set.

The benchmarks (bench/) and drafter evaluation (train/eval.py) measure on PROMPTS; serving
knobs are tuned on TUNING_PROMPTS; train/prompts.py removes both from the training prompts.
"""
from __future__ import annotations

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


# Tuning prompts for serving knobs (bench/draft_stop.py): in neither the drafters' training
# prompts (train/prompts.py) nor the held-out set above, so a knob tuned here is not fitted
# to the figures it is judged by.
TUNING_PROMPTS = [
    "Write a short story about a baker who discovers a secret recipe in an old book.",
    "Draft a thank-you note to a neighbor who watered my plants while I was away.",
    "Describe a rainy afternoon in a small coffee shop.",
    "You are a museum guide. Introduce the dinosaur hall to a group of children.",
    "Pretend to be a chef and explain tonight's special to a guest.",
    "If every student in a class passed the test and Anna is in the class, did Anna pass? Explain.",
    "A train leaves at 3 pm and travels for 2.5 hours. When does it arrive? Explain.",
    "What is 12 multiplied by 13? Show the steps.",
    "A rectangle is 8 meters long and 5 meters wide. What is its area and perimeter?",
    "Write a Python function that returns the largest even number in a list, or None.",
    "Write a Python function that reverses a list without using the reverse method.",
    "Explain what a stack is in computer science, with a short Python example.",
    "List the main ingredients mentioned: 'The soup needs carrots, onions, garlic and two cups of broth.'",
    "Extract the dates from this text: 'The meeting moved from March 3 to March 10, and the report is due April 1.'",
    "Explain why the sky appears blue during the day.",
    "What are the main differences between plants and animals?",
    "Describe the water cycle in simple terms.",
    "Why do we have seasons on Earth?",
    "Give three tips for staying focused while studying.",
    "What are some good habits for a healthy morning routine?",
    "Explain the difference between weather and climate.",
    "Summarize the benefits of regular exercise in a few sentences.",
    "Write a haiku about autumn leaves.",
    "Explain how a bicycle works to a ten-year-old.",
]


def flat_prompts(n: int | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs, interleaving categories so any prefix is balanced."""
    out = []
    for i in range(3):
        for cat, ps in PROMPTS.items():
            out.append((cat, ps[i]))
    return out[:n] if n else out

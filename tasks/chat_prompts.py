"""General chat prompts for replay while task-tuning (`lora(data=svamp-train+chat-replay)`):
the model's own replies to these, recorded before tuning, are trained on beside the task, so
it keeps answering ordinary questions in words instead of the task's "N + M = K." style.

Written here from instruction templates x everyday topics. Geography (countries, capitals,
continents, currencies) is left out on purpose: the QA check that measures chat quality asks
about exactly those, so replaying them would teach to the test.
"""

from __future__ import annotations

import random

INSTRUCTIONS = [
    "Explain {t} in two sentences.",
    "What is {t}?",
    "Give me three facts about {t}.",
    "Write a short paragraph about {t} for a child.",
    "Why is {t} important?",
]

TOPICS = [
    "photosynthesis", "the water cycle", "gravity", "volcanoes", "the moon", "rainbows", "bees", "the human heart",
    "electricity", "magnets", "sleep", "exercise", "recycling", "the internet", "computers", "batteries",
    "vaccines", "bread baking", "coffee", "tea", "chess", "music", "painting", "poetry", "libraries",
    "bicycles", "trains", "airplanes", "the ocean", "clouds", "thunderstorms", "snow", "deserts", "forests",
    "dinosaurs", "whales", "owls", "ants", "friendship", "kindness", "time management", "saving money",
    "learning a language", "reading books", "gardening", "cooking pasta", "the solar system", "stars",
    "telescopes", "microscopes", "robots", "email", "passwords", "smartphones", "solar panels", "wind power",
    "clean water", "healthy breakfast", "first aid", "teamwork",
]


def chat_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Every instruction x topic (300), shuffled with a fixed seed; the first n."""
    rows = [i.format(t=t) for t in TOPICS for i in INSTRUCTIONS]
    random.Random(seed).shuffle(rows)
    return rows[:n] if n is not None else rows

"""Deterministic synthetic mail for the Bayes tests (no corpus needed)."""
from __future__ import annotations

import random

HAM_WORDS = ("meeting agenda minutes project review schedule budget quarterly report draft "
             "attached comments thanks regards team deadline release notes patch build server "
             "kernel compile bug ticket lunch tomorrow colleague conference slides").split()
SPAM_WORDS = ("viagra cheap pills casino winner lottery prize claim unsubscribe offer "
              "discount mortgage refinance credit guaranteed bonus jackpot investment "
              "million dollars urgent transfer beneficiary pharmacy replica watches").split()
COMMON = "the and for you this that with have from your will are not".split()


def synth(kind: str, i: int, seed: int = 7) -> bytes:
    rng = random.Random(f"{seed}-{kind}-{i}")
    words = HAM_WORDS if kind == "ham" else SPAM_WORDS
    body = " ".join(rng.choice(words if rng.random() < 0.6 else COMMON) for _ in range(60))
    subj = " ".join(rng.choice(words) for _ in range(4))
    sender = "colleague@work.example" if kind == "ham" else f"promo{i}@deals{i % 7}.example"
    url = ("https://wiki.work.example/page" if kind == "ham"
           else f"http://win-{i % 5}.prizes.example/claim?id={i}")
    return (f"From: Someone <{sender}>\r\nTo: bob@example.org\r\nSubject: {subj}\r\n"
            f"Message-ID: <{kind}{i}.{seed}@example>\r\nDate: Fri, 27 Nov 2026 08:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}\r\n{url}\r\n").encode()

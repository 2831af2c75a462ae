"""The seeded multi-tenant chat workload of bench/routing.

- `tenants` tenants, each with a long system prompt of `system_tokens` tokens
  (uniform in the range; the simulator's tokenizer makes one token of each word
  and of each punctuation mark, so the text is built from words and marks);
- conversations: conversation i is a pure function of (seed, i): its tenant, drawn
  with Zipf(s) popularity over the tenants (tenant 0 the most popular), its number
  of turns (uniform in `turns`), each turn's user message (`user_tokens`) and
  max_tokens (`max_tokens`);
- a turn's request = the system prompt + every earlier user message and the
  assistant text the backend actually returned + the new user message, so the
  prompt extends the sequence the backend cached at the end of the previous turn.

Every target replays the same conversations in the same order (closed loop:
each of `concurrency` slots takes the next conversation when its previous one
ended), so the request sequence is the same for every policy.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkloadSpec:
    seed: int = 1
    tenants: int = 12
    zipf_s: float = 1.1
    system_tokens: tuple[int, int] = (1000, 4000)
    turns: tuple[int, int] = (3, 8)
    user_tokens: tuple[int, int] = (100, 1200)
    max_tokens: tuple[int, int] = (64, 128)

    def describe(self) -> str:
        return (f"seed {self.seed}; {self.tenants} tenants, Zipf s={self.zipf_s} popularity, system prompts "
                f"{self.system_tokens[0]}-{self.system_tokens[1]} tokens; conversations of {self.turns[0]}-"
                f"{self.turns[1]} turns, user messages {self.user_tokens[0]}-{self.user_tokens[1]} tokens, "
                f"max_tokens {self.max_tokens[0]}-{self.max_tokens[1]}")


@dataclass
class Conversation:
    index: int
    tenant: int
    system: str
    users: list[str]  # one user message per turn
    max_tokens: list[int]  # one per turn
    messages: list[dict] = field(default_factory=list)  # history so far (grows turn by turn)


def _vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(words)


class Workload:
    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        rng = random.Random(f"routing-vocab:{spec.seed}")
        self.words = _vocabulary(rng)
        # Zipf popularity: P(tenant k) ∝ 1 / (k + 1)^s.
        weights = [1.0 / (k + 1) ** spec.zipf_s for k in range(spec.tenants)]
        total = sum(weights)
        self.popularity = [w / total for w in weights]
        self._cumulative = []
        acc = 0.0
        for w in self.popularity:
            acc += w
            self._cumulative.append(acc)
        self.systems = []
        for tenant in range(spec.tenants):
            trng = random.Random(f"routing-tenant:{spec.seed}:{tenant}")
            length = trng.randint(*spec.system_tokens)
            head = f"You are the assistant of tenant {tenant}."  # 8 tokens
            self.systems.append(head + self._text(trng, length - 8))

    def _text(self, rng: random.Random, tokens: int) -> str:
        """About `tokens` tokens of words with a comma or full stop now and then."""
        parts: list[str] = []
        count = 0
        words = self.words
        while count < tokens:
            parts.append(" " + rng.choice(words))
            count += 1
            if count < tokens and rng.random() < 0.08:
                parts.append(rng.choice(".,"))
                count += 1
        return "".join(parts)

    def conversation(self, index: int) -> Conversation:
        spec = self.spec
        rng = random.Random(f"routing-conversation:{spec.seed}:{index}")
        tenant = min(bisect.bisect_left(self._cumulative, rng.random()), spec.tenants - 1)
        turns = rng.randint(*spec.turns)
        users = [f"Question {t + 1} of conversation {index}:" + self._text(rng, rng.randint(*spec.user_tokens))
                 for t in range(turns)]
        max_tokens = [rng.randint(*spec.max_tokens) for _ in range(turns)]
        return Conversation(index, tenant, self.systems[tenant], users, max_tokens,
                            [{"role": "system", "content": self.systems[tenant]}])

    def system_tokens_total(self) -> int:
        from inference.sim.tokenizer import tokenize

        return sum(len(tokenize(s)) for s in self.systems)

"""Price book arithmetic: token classes, currencies, exact costs and the one rounding rule.

The rounding rule (the only place costs are rounded):
  the cost of a price line (a price version × token class) over a period is
      Σ tokens × per_million_price / 1,000,000          (exact, Decimal, currency units)
  converted to minor units (× 10^exponent), then rounded ONCE to an integer with ROUND_HALF_UP
  (halves away from zero; quantities are never negative in a period total).
A tenant's cost for a period is the sum of its already-rounded line amounts. This is what
Stripe does with the metered prices `stripe_catalog_sync` creates: each invoice line is
quantity × unit_amount_decimal (= per_million × 10^exponent / 10^6, exact) rounded half away
from zero to whole minor units, and the invoice total is the sum of its lines.
Bucket costs shown by the usage API are rounded per bucket for display (same rule) and carry
the exact value too; only period totals are billed.
"""
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .models import TokenClass

TOKENS_PER_MILLION = Decimal(1_000_000)
# Stripe allows at most 12 decimal places in unit_amount_decimal (minor units per token).
STRIPE_UNIT_AMOUNT_MAX_PLACES = 12

# Digits after the decimal point of each currency's minor unit (ISO 4217); others are 2.
_ZERO_DECIMAL = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
                 "xaf", "xof", "xpf"}
_THREE_DECIMAL = {"bhd", "jod", "kwd", "omr", "tnd"}


def currency_exponent(currency: str) -> int:
    code = currency.lower()
    if code in _ZERO_DECIMAL:
        return 0
    if code in _THREE_DECIMAL:
        return 3
    return 2


def minor_units_round(exact_minor: Decimal) -> int:
    """The rounding rule: to a whole minor unit, halves away from zero (ROUND_HALF_UP)."""
    return int(exact_minor.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def unit_amount_minor(*, per_million: Decimal, currency: str) -> Decimal:
    """Minor units per token, exact (what a Stripe metered price's unit_amount_decimal holds)."""
    return (per_million * (Decimal(10) ** currency_exponent(currency)) / TOKENS_PER_MILLION).normalize()


def unit_amount_places_ok(*, per_million: Decimal, currency: str) -> bool:
    exponent = unit_amount_minor(per_million=per_million, currency=currency).as_tuple().exponent
    return -int(exponent) <= STRIPE_UNIT_AMOUNT_MAX_PLACES if isinstance(exponent, int) else False


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt: int = 0  # cached ones included
    cached: int = 0
    completion: int = 0

    def by_class(self) -> dict[str, int]:
        cached = min(self.cached, self.prompt)
        return {TokenClass.INPUT: self.prompt - cached, TokenClass.CACHED_INPUT: cached,
                TokenClass.OUTPUT: self.completion}


def exact_cost_minor(*, tokens: int, per_million: Decimal, currency: str) -> Decimal:
    """Exact cost of `tokens` tokens in minor units (no rounding)."""
    return Decimal(tokens) * unit_amount_minor(per_million=per_million, currency=currency)


def period_cost_minor(*, line_quantities: Iterable[tuple[int, Decimal]], currency: str) -> int:
    """A period's cost: each (tokens, per_million) line rounded once, then summed."""
    return sum(minor_units_round(exact_cost_minor(tokens=tokens, per_million=per_million, currency=currency))
               for tokens, per_million in line_quantities)

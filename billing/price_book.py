"""The price book: effective-dated prices per model version (writes and the in-memory lookup)."""
import bisect
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from .models import Price, PriceLine, TokenClass, UsageRollup
from .pricing import unit_amount_places_ok


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


def price_line_event_name(*, price: Price, token_class: str) -> str:
    """`<class>.<model>.<version>.<8 hex>`: readable in Stripe's dashboard, unique by the hash of
    (model, version, class), at most 100 characters (Stripe's limit)."""
    digest = hashlib.sha256(f"{price.model}\0{price.version}\0{token_class}".encode()).hexdigest()[:8]
    return f"{token_class}.{_slug(price.model, 50)}.{_slug(price.version, 24)}.{digest}"


def price_create(
    *,
    model: str,
    version: str,
    input_per_million: Decimal,
    cached_input_per_million: Decimal,
    output_per_million: Decimal,
    effective_from: datetime,
    currency: str | None = None,
) -> Price:
    """Adds a price version. It may not start where usage of the model is already rolled up
    (that would reprice the past), must start on a whole UTC hour (a rollup bucket has one
    price), and must be expressible exactly as a Stripe unit_amount_decimal."""
    currency = (currency or settings.BILLING_CURRENCY).lower()
    if currency != settings.BILLING_CURRENCY.lower():
        raise ValidationError(f"Prices must be in {settings.BILLING_CURRENCY} (BILLING_CURRENCY).")
    if timezone.is_naive(effective_from):
        raise ValidationError("effective_from must be timezone-aware.")
    if effective_from.minute or effective_from.second or effective_from.microsecond:
        raise ValidationError("effective_from must fall on a whole hour (UTC).")
    amounts = {"input_per_million": Decimal(input_per_million),
               "cached_input_per_million": Decimal(cached_input_per_million),
               "output_per_million": Decimal(output_per_million)}
    for name, amount in amounts.items():
        if amount < 0:
            raise ValidationError(f"{name} must not be negative.")
        if not unit_amount_places_ok(per_million=amount, currency=currency):
            raise ValidationError(f"{name}: {amount} per million is finer than Stripe's 12 decimal places "
                                  "of a minor unit per token.")
    with transaction.atomic():
        if UsageRollup.objects.filter(model=model, width=UsageRollup.Width.HOUR,
                                      bucket_start__gte=effective_from).exists():
            raise ValidationError(f"Usage of {model} from {effective_from.isoformat()} is already rolled up; "
                                  "a new price may only start after it.")
        price = Price(model=model, version=version, currency=currency, effective_from=effective_from, **amounts)
        price.full_clean()
        price.save()
        PriceLine.objects.bulk_create([
            PriceLine(price=price, token_class=token_class,
                      event_name=price_line_event_name(price=price, token_class=token_class))
            for token_class in TokenClass.values
        ])
    return price


@dataclass
class PriceBook:
    """Every price version of some models, looked up by the moment tokens were used."""

    _starts: dict[str, list[datetime]] = field(default_factory=dict)
    _prices: dict[str, list[Price]] = field(default_factory=dict)
    lines: dict[tuple[int, str], PriceLine] = field(default_factory=dict)

    def price_at(self, model: str, at: datetime) -> Price | None:
        starts = self._starts.get(model)
        if not starts:
            return None
        index = bisect.bisect_right(starts, at) - 1
        return self._prices[model][index] if index >= 0 else None

    def line(self, price: Price, token_class: str) -> PriceLine:
        return self.lines[(price.pk, token_class)]


def price_book_load(*, models: Iterable[str] | None = None) -> PriceBook:
    prices = Price.objects.order_by("model", "effective_from")
    if models is not None:
        prices = prices.filter(model__in=list(models))
    book = PriceBook()
    for price in prices:
        book._starts.setdefault(price.model, []).append(price.effective_from)
        book._prices.setdefault(price.model, []).append(price)
    for line in PriceLine.objects.filter(price__in=[p for ps in book._prices.values() for p in ps]):
        book.lines[(line.price_id, line.token_class)] = line
    return book

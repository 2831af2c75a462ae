"""The price book and the rounding rule."""
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from billing.price_book import price_book_load, price_create
from billing.pricing import (exact_cost_minor, minor_units_round, period_cost_minor, unit_amount_minor,
                             unit_amount_places_ok)


def test_unit_amount_is_exact_minor_units_per_token():
    # $2.50 per 1M tokens = 250 cents / 1M = 0.00025 cents per token
    assert unit_amount_minor(per_million=Decimal("2.5"), currency="usd") == Decimal("0.00025")
    assert unit_amount_minor(per_million=Decimal("300"), currency="jpy") == Decimal("0.0003")
    # 8 decimal places per million in USD is 12 per token: Stripe's limit, still exact
    assert unit_amount_places_ok(per_million=Decimal("0.00000001"), currency="usd")
    assert not unit_amount_places_ok(per_million=Decimal("0.00000001"), currency="jpy")  # 14 places


@pytest.mark.parametrize("exact, rounded", [
    (Decimal("0.5"), 1), (Decimal("1.4999999"), 1), (Decimal("2.5"), 3), (Decimal("2.4999"), 2),
    (Decimal("0"), 0), (Decimal("1234.5000001"), 1235),
])
def test_rounding_is_half_up_to_whole_minor_units(exact, rounded):
    assert minor_units_round(exact) == rounded


def test_a_period_is_rounded_once_per_line_not_per_bucket():
    # given 3 hourly buckets of 2,000 tokens at $2.50/1M: each is exactly 0.5 cents
    per_million = Decimal("2.5")
    buckets = [exact_cost_minor(tokens=2000, per_million=per_million, currency="usd")] * 3
    assert buckets[0] == Decimal("0.5")
    # then rounding each bucket would bill 3 cents; the rule bills the line total once: 1.5 → 2
    assert sum(minor_units_round(b) for b in buckets) == 3
    assert period_cost_minor(line_quantities=[(6000, per_million)], currency="usd") == 2
    # and lines are rounded separately, then summed: 0.5 → 1 and 0.25 → 0
    assert period_cost_minor(line_quantities=[(2000, per_million), (1000, per_million)], currency="usd") == 1


@pytest.mark.django_db
def test_price_versions_are_effective_dated():
    old = price_create(model="dated-llm", version="v1", input_per_million=Decimal("1"),
                       cached_input_per_million=Decimal("0.5"), output_per_million=Decimal("2"),
                       effective_from=datetime(2024, 1, 1, tzinfo=UTC))
    new = price_create(model="dated-llm", version="v2", input_per_million=Decimal("3"),
                       cached_input_per_million=Decimal("1.5"), output_per_million=Decimal("6"),
                       effective_from=datetime(2024, 6, 1, 10, tzinfo=UTC))
    book = price_book_load(models=["dated-llm"])
    assert book.price_at("dated-llm", datetime(2023, 12, 31, tzinfo=UTC)) is None
    assert book.price_at("dated-llm", datetime(2024, 6, 1, 9, 59, tzinfo=UTC)).pk == old.pk
    assert book.price_at("dated-llm", datetime(2024, 6, 1, 10, tzinfo=UTC)).pk == new.pk
    assert {line.token_class for line in new.lines.all()} == {"input", "cached_input", "output"}
    assert all(len(line.event_name) <= 100 for line in new.lines.all())


@pytest.mark.django_db
@pytest.mark.parametrize("effective_from, message", [
    (datetime(2024, 1, 1, 10, 30, tzinfo=UTC), "whole hour"),
    (datetime(2024, 1, 1, 10), "timezone-aware"),
])
def test_price_validation(effective_from, message):
    with pytest.raises(ValidationError, match=message):
        price_create(model="bad-llm", version="v1", input_per_million=Decimal("1"),
                     cached_input_per_million=Decimal("1"), output_per_million=Decimal("1"),
                     effective_from=effective_from)


@pytest.mark.django_db
def test_a_new_price_cannot_reprice_rolled_up_usage(make_tenant):
    from billing.models import UsageRollup

    tk = make_tenant()
    UsageRollup.objects.create(tenant=tk.tenant, api_key=tk.api_key, model="repriced-llm", width="hour",
                               bucket_start=datetime(2024, 3, 1, 12, tzinfo=UTC), requests=1, prompt_tokens=10,
                               updated_at=datetime(2024, 3, 1, 13, tzinfo=UTC))
    with pytest.raises(ValidationError, match="already rolled up"):
        price_create(model="repriced-llm", version="v2", input_per_million=Decimal("1"),
                     cached_input_per_million=Decimal("1"), output_per_million=Decimal("1"),
                     effective_from=datetime(2024, 3, 1, tzinfo=UTC))

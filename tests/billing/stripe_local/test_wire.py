"""Units: bracket form decoding and invoice amount arithmetic (no server)."""

from decimal import Decimal

import pytest

from billing.stripe_local.errors import StripeError
from billing.stripe_local.invoicing import price_amount
from billing.stripe_local.wire import add_interval, decimal_str, form_decode


def test_form_decode_nests_brackets_and_indexed_lists():
    params = form_decode("items[0][price]=price_1&items[1][price]=price_2&items[1][quantity]=3"
                         "&metadata[0]=zero&expand[]=a&expand[]=b&payload[stripe_customer_id]=cus_1")
    assert params == {"items": [{"price": "price_1"}, {"price": "price_2", "quantity": "3"}],
                      "metadata": {"0": "zero"}, "expand": ["a", "b"],
                      "payload": {"stripe_customer_id": "cus_1"}}


def test_form_decode_reads_percent_encoded_brackets_and_keeps_empty_values():
    assert form_decode("expand%5B0%5D=data.customer&metadata%5Bk%5D=") == {
        "expand": ["data.customer"], "metadata": {"k": ""}}


def test_form_decode_rejects_a_scalar_used_as_a_hash():
    with pytest.raises(StripeError) as caught:
        form_decode("a=1&a[b]=2")
    assert caught.value.status == 400


PER_UNIT = {"billing_scheme": "per_unit", "unit_amount_decimal": "0.25"}
GRADUATED = {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": [
    {"up_to": 100, "unit_amount_decimal": "2", "flat_amount_decimal": "50"},
    {"up_to": None, "unit_amount_decimal": "1", "flat_amount_decimal": None}]}
VOLUME = {**GRADUATED, "tiers_mode": "volume"}


@pytest.mark.parametrize("price, quantity, expected", [
    (PER_UNIT, "10", "2.5"),
    (PER_UNIT, "-4", "0"),  # a negative period total bills as 0
    (GRADUATED, "0", "0"),
    (GRADUATED, "100", "250"),  # 100 × 2 + 50
    (GRADUATED, "150", "300"),  # 250 + 50 × 1
    (VOLUME, "150", "150"),  # all 150 units at the second tier
    (VOLUME, "80", "210"),  # 80 × 2 + 50
])
def test_price_amount(price, quantity, expected):
    assert price_amount(price, Decimal(quantity)) == Decimal(expected)


def test_decimal_str_prints_like_stripe():
    assert decimal_str(Decimal("1.500")) == "1.5"
    assert decimal_str(Decimal("1E+3")) == "1000"
    assert decimal_str(Decimal("0.000000000001")) == "0.000000000001"


def test_add_interval_clamps_month_ends():
    jan_31 = 1706659200  # 2024-01-31T00:00:00Z
    assert add_interval(jan_31, "month", 1) == 1709164800  # 2024-02-29
    assert add_interval(jan_31, "month", 1, times=2) == 1711843200  # 2024-03-31
    assert add_interval(jan_31, "day", 2) == jan_31 + 2 * 86400

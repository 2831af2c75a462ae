"""Customers, products, prices, lists, search, errors, authentication and idempotency,
through stripe-python against the real server process."""

import uuid

import pytest
import stripe


def test_customer_lifecycle_and_metadata_semantics(client):
    # given a customer with two metadata keys
    customer = client.v1.customers.create(params={"email": "ada@example.com", "name": "Ada",
                                                  "metadata": {"tenant": "t1", "plan": "pro"}})
    assert customer.id.startswith("cus_") and customer.object == "customer"
    assert customer.last_response.headers["Request-Id"].startswith("req_")
    # when one key is emptied and another added
    updated = client.v1.customers.update(customer.id, params={"metadata": {"plan": "", "region": "eu"}})
    # then the empty one is deleted and the rest merged
    assert updated.metadata.to_dict() == {"tenant": "t1", "region": "eu"}
    assert client.v1.customers.retrieve(customer.id).email == "ada@example.com"
    # and deleting answers the deleted stub, which retrieve then returns too
    deleted = client.v1.customers.delete(customer.id)
    assert deleted.deleted is True and deleted.id == customer.id
    assert client.v1.customers.retrieve(customer.id).deleted is True
    assert [c.id for c in client.v1.customers.list()] == []


def test_customer_updated_event_has_previous_attributes(client):
    customer = client.v1.customers.create(params={"name": "Old"})
    client.v1.customers.update(customer.id, params={"name": "New"})
    [event] = client.v1.events.list(params={"type": "customer.updated"}).data
    assert event.data.object.name == "New"
    assert event.data.previous_attributes.to_dict() == {"name": "Old"}


def test_list_pages_with_auto_paging_iter(client):
    # given 25 customers (listed newest first)
    created = [client.v1.customers.create(params={"name": f"c{i}"}).id for i in range(25)]
    # when listed with the default limit
    first = client.v1.customers.list()
    assert len(first.data) == 10 and first.has_more and first.url == "/v1/customers"
    # then auto paging walks all of them once, newest first
    assert [c.id for c in first.auto_paging_iter()] == created[::-1]
    # and ending_before pages backwards
    page = client.v1.customers.list(params={"limit": 3, "ending_before": created[10]})
    assert [c.id for c in page.data] == created[13:10:-1]


def test_list_limit_out_of_range_is_rejected(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.customers.list(params={"limit": 101})
    assert caught.value.param == "limit"


def test_missing_object_is_404_resource_missing(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.customers.retrieve("cus_missing")
    error = caught.value
    assert error.http_status == 404
    assert error.code == "resource_missing" and error.param == "id"
    assert error.user_message == "No such customer: 'cus_missing'"
    assert error.request_id.startswith("req_")
    assert error.json_body["error"]["type"] == "invalid_request_error"


def test_missing_and_unknown_parameters(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.products.create(params={"description": "no name"})
    assert (caught.value.code, caught.value.param) == ("parameter_missing", "name")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.customers.create(params={"colour": "blue"})
    assert (caught.value.code, caught.value.param) == ("parameter_unknown", "colour")


def test_unknown_url_is_404(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.raw_request("get", "/v1/no_such_thing")
    assert caught.value.http_status == 404 and "Unrecognized request URL" in caught.value.user_message


def test_search_by_metadata_and_email(client):
    match = client.v1.customers.create(params={"email": "x@example.com", "metadata": {"tenant_id": "42"}})
    client.v1.customers.create(params={"email": "y@example.com", "metadata": {"tenant_id": "43"}})
    found = client.v1.customers.search(params={"query": "metadata['tenant_id']:'42'"})
    assert found.object == "search_result" and [c.id for c in found.data] == [match.id]
    assert [c.id for c in client.v1.customers.search(params={"query": "email:'x@example.com'"}).data] == [match.id]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.search(params={"query": "colour:'blue'"})


def test_prices_decimal_amounts_product_data_and_tiers(client):
    meter = client.v1.billing.meters.create(params={
        "display_name": "Tokens", "event_name": "tokens", "default_aggregation": {"formula": "sum"}})
    price = client.v1.prices.create(params={
        "currency": "usd", "product_data": {"name": "Tokens"}, "unit_amount_decimal": "0.000125",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id}, "lookup_key": "tokens"})
    assert price.id.startswith("price_") and price.product.startswith("prod_")
    assert price.unit_amount is None and str(price.unit_amount_decimal) == "0.000125"
    assert price.recurring.meter == meter.id and price.type == "recurring"
    # a metered price must name its meter
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.prices.create(params={"currency": "usd", "product": price.product, "unit_amount": 1,
                                        "recurring": {"interval": "month", "usage_type": "metered"}})
    assert (caught.value.code, caught.value.param) == ("parameter_missing", "recurring[meter]")
    # tiers come back only when expanded
    tiered = client.v1.prices.create(params={
        "currency": "usd", "product": price.product, "billing_scheme": "tiered", "tiers_mode": "graduated",
        "tiers": [{"up_to": 1000, "unit_amount": 2}, {"up_to": "inf", "unit_amount_decimal": "1.5"}],
        "recurring": {"interval": "month"}})
    assert "tiers" not in tiered
    expanded = client.v1.prices.retrieve(tiered.id, params={"expand": ["tiers"]})
    assert [t.up_to for t in expanded.tiers] == [1000, None]
    assert [p.id for p in client.v1.prices.list(params={"lookup_keys": ["tokens"]})] == [price.id]


def test_expand_customer_on_a_subscription(client):
    customer = client.v1.customers.create(params={"name": "E"})
    price = client.v1.prices.create(params={"currency": "usd", "unit_amount": 500, "product_data": {"name": "P"},
                                            "recurring": {"interval": "month"}})
    subscription = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}],
                                                          "expand": ["customer", "latest_invoice"]})
    assert subscription.customer.name == "E"
    assert subscription.latest_invoice.object == "invoice"


def test_idempotent_replay_of_customer_create(client):
    key = str(uuid.uuid4())
    first = client.v1.customers.create(params={"email": "i@example.com"}, options={"idempotency_key": key})
    again = client.v1.customers.create(params={"email": "i@example.com"}, options={"idempotency_key": key})
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert len(client.v1.customers.list().data) == 1
    # the same key with other parameters, or on another endpoint, is refused
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create(params={"email": "other@example.com"}, options={"idempotency_key": key})
    with pytest.raises(stripe.IdempotencyError):
        client.v1.products.create(params={"name": "x"}, options={"idempotency_key": key})


def test_validation_failures_are_not_stored_under_the_idempotency_key(client):
    key = str(uuid.uuid4())
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.products.create(params={}, options={"idempotency_key": key})
    # the retry with the same (still invalid) request runs again rather than replaying
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.products.create(params={}, options={"idempotency_key": key})
    assert "Idempotent-Replayed" not in (caught.value.headers or {})


def test_any_test_key_is_accepted_but_others_are_not(server):
    assert server.client("sk_test_anything").v1.customers.list().data == []
    with pytest.raises(stripe.AuthenticationError) as caught:
        server.client("sk_live_nope").v1.customers.list()
    assert caught.value.http_status == 401
    assert caught.value.json_body["error"]["type"] == "invalid_request_error"


def test_a_configured_api_key_is_the_only_one_accepted(server_factory):
    server = server_factory("--api-key", "sk_test_only")
    assert server.client("sk_test_only").v1.customers.list().data == []
    with pytest.raises(stripe.AuthenticationError):
        server.client("sk_test_other").v1.customers.list()


def test_product_with_prices_cannot_be_deleted(client):
    product = client.v1.products.create(params={"name": "Keep"})
    client.v1.prices.create(params={"currency": "usd", "unit_amount": 100, "product": product.id})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.products.delete(product.id)
    assert client.v1.products.delete(client.v1.products.create(params={"name": "Gone"}).id).deleted is True


def test_expand_on_list_items(client):
    customer = client.v1.customers.create(params={"name": "L"})
    price = client.v1.prices.create(params={"currency": "usd", "unit_amount": 500, "product_data": {"name": "P"},
                                            "recurring": {"interval": "month"}})
    client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    [subscription] = client.v1.subscriptions.list(params={"expand": ["data.customer"]}).data
    assert subscription.customer.name == "L"

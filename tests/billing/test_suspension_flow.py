"""Past due → suspended → paid → active, end to end: the local Stripe server issues the invoice
and the payment outcomes and delivers signed webhooks to the gateway process; the gateway
answers the tenant's key accordingly."""
import openai
import pytest
from django.utils import timezone

from billing.accounts import past_due_accounts_suspend
from billing.meter_push import meter_pushes_plan, meter_pushes_send
from billing.models import BillingAccount, StripeEvent
from billing.rollups import usage_rollup_catch_up
from billing.services import usage_records_write
from tenants.models import Tenant
from tests.billing.conftest import usage_event, wait_for

BODY = {"model": "test-llm", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}


def chat_status(gateway, secret: str) -> tuple[int, dict | None]:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    try:
        client.chat.completions.create(**BODY)
        return 200, None
    except openai.APIStatusError as error:
        return error.status_code, error.body


def account_of(tk) -> BillingAccount:
    return BillingAccount.objects.select_related("tenant").get(tenant=tk.tenant)


def test_payment_failure_suspends_after_the_grace_period_and_payment_restores(
        billing_gateway, billing_tenant, stripe_local, billing_settings):
    tk = billing_tenant()
    assert chat_status(billing_gateway, tk.secret)[0] == 200
    # given a month with usage, invoiced by Stripe
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=0, completion=2_000_000)])
    usage_rollup_catch_up()
    meter_pushes_plan()
    meter_pushes_send()
    status, invoice = stripe_local.local(
        "POST", f"/_local/subscriptions/{tk.account.stripe_subscription_id}/close_period")
    assert status == 200 and invoice["amount_due"] == 120  # 2M output tokens × $0.60/1M
    # when the charge fails
    status, _ = stripe_local.local("POST", f"/_local/invoices/{invoice['id']}/payment", {"outcome": "failed"})
    assert status == 200
    # then the webhook makes the account past due; within the grace period the key still works
    wait_for(lambda: account_of(tk).status == "past_due", timeout=15)
    billing_settings.BILLING_PAST_DUE_GRACE_SECONDS = 3600
    assert past_due_accounts_suspend() == []
    assert chat_status(billing_gateway, tk.secret)[0] == 200
    # when the grace period is over, the periodic enforcement suspends the tenant
    billing_settings.BILLING_PAST_DUE_GRACE_SECONDS = 0
    assert past_due_accounts_suspend() == [tk.tenant.pk]
    # then the gateway answers 403 account_suspended at once, saying why
    status, body = wait_for(lambda: (lambda r: r if r[0] == 403 else None)(chat_status(billing_gateway, tk.secret)),
                            timeout=10)
    assert body["code"] == "account_suspended" and body["type"] == "permission_error"
    assert f"Payment failed: {invoice['id']} is unpaid" in body["message"]
    # when the invoice is paid
    status, paid = stripe_local.local("POST", f"/_local/invoices/{invoice['id']}/payment",
                                      {"outcome": "succeeded"})
    assert status == 200 and paid["status"] == "paid"
    # then invoice.paid reactivates the tenant and its key works again
    wait_for(lambda: Tenant.objects.get(pk=tk.tenant.pk).status == "active", timeout=15)
    account = account_of(tk)
    assert (account.status, account.suspension, account.past_due_since) == ("active", "", None)
    wait_for(lambda: chat_status(billing_gateway, tk.secret)[0] == 200, timeout=10)
    assert StripeEvent.objects.filter(type="invoice.paid", payload__data__object__id=invoice["id"]).count() == 1


def test_a_suspension_not_made_by_billing_is_not_lifted_by_a_payment(billing_tenant, billing_settings):
    from billing.accounts import billing_account_paid
    from tenants.services import tenant_suspend

    tk = billing_tenant()
    tenant_suspend(tenant=tk.tenant, reason="Terms of service")
    billing_account_paid(account=account_of(tk))
    assert Tenant.objects.get(pk=tk.tenant.pk).status == "suspended"


@pytest.mark.parametrize("tier", ["free"])
def test_invoices_are_listed_from_stripe(billing_gateway, billing_tenant, tier):
    import urllib.request
    import json

    tk = billing_tenant(tier=tier)
    request = urllib.request.Request(billing_gateway.url + "/billing/invoices",
                                     headers={"Authorization": f"Bearer {tk.secret}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    # the subscription's first invoice (nothing licensed: zero, paid at once)
    assert body["object"] == "list" and len(body["data"]) == 1
    assert body["data"][0]["id"].startswith("in_") and body["data"][0]["status"] == "paid"

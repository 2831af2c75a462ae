"""Limits edited in Django admin: tier defaults, a tenant's overrides and a key's
limits take effect on every gateway process at once, not when its cache expires."""
import time
from html.parser import HTMLParser

import openai
import pytest
from django.test import Client

from tenants.models import ApiKey, Tenant, TierLimits
from tenants.services import limits_set

MESSAGES = [{"role": "user", "content": "Hello"}]


class _FormFields(HTMLParser):
    """The fields a browser would submit from the admin's change form, as rendered."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id = form_id
        self.inside = False
        self.fields: dict[str, str] = {}
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside or "name" not in a and tag not in ("option",):
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("submit", "button", "file") or (kind == "checkbox" and "checked" not in a):
                return
            self.fields[a["name"]] = a.get("value") or ("on" if kind == "checkbox" else "")
        elif tag == "select":
            self._select = a["name"]
            self.fields.setdefault(a["name"], "")
        elif tag == "option" and self._select and "selected" in a:
            self.fields[self._select] = a.get("value", "")
        elif tag == "textarea":
            self._textarea = a["name"]
            self.fields[a["name"]] = ""

    def handle_data(self, data):
        if self._textarea:
            self.fields[self._textarea] += data

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None


def admin_edit(client: Client, model, pk, **changes) -> None:
    """Opens the object's change form in admin, changes `changes`, saves it."""
    url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/{pk}/change/"
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    parser = _FormFields(f"{model._meta.model_name}_form")
    parser.feed(page.content.decode())
    missing = set(changes) - set(parser.fields)
    assert not missing, f"not on the form: {missing}"
    data = {**parser.fields, **{k: "" if v is None else str(v) for k, v in changes.items()}, "_save": "Save"}
    saved = client.post(url, data)
    assert saved.status_code == 302, saved.content.decode()[-2000:]


@pytest.fixture
def admin_client(live_db):
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(
        username="limits-admin", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(user)
    return client


def limit_header(client: openai.OpenAI, expected: str, name: str = "x-ratelimit-limit-requests") -> str:
    """The header's value once it is `expected`, or its last value after 5 s (the
    gateway's key cache lives 30 s, so only a reload brings a change within 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            headers = client.chat.completions.with_raw_response.create(
                model="test-llm", messages=MESSAGES, max_tokens=2).headers
        except openai.RateLimitError as refused:  # the old limit, still in force
            headers = refused.response.headers
        value = headers.get(name)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_admin_edits_of_tenant_and_key_limits_reach_the_gateway_at_once(gateway, make_tenant, admin_client):
    tk = make_tenant()
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    assert limit_header(client, "600") == "600"  # the standard tier's default, now cached

    admin_edit(admin_client, Tenant, tk.tenant.pk, rpm_limit=450)
    assert limit_header(client, "450") == "450"
    assert Tenant.objects.get(pk=tk.tenant.pk).rpm_limit == 450

    # The key's own limit is the tighter scope: the headers report it.
    admin_edit(admin_client, ApiKey, tk.api_key.pk, rpm_limit=2)
    assert limit_header(client, "2") == "2"
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):
            client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)

    # Cleared again: no key-level limit, the tenant's 450 applies.
    admin_edit(admin_client, ApiKey, tk.api_key.pk, rpm_limit=None)
    assert ApiKey.objects.get(pk=tk.api_key.pk).rpm_limit is None
    assert limit_header(client, "450") == "450"


def test_admin_edit_of_a_tier_default_reaches_its_tenants_but_not_their_overrides(gateway, make_tenant,
                                                                                 admin_client):
    plain = make_tenant(tier="premium")
    overridden = make_tenant(tier="premium", tenant_limits={"rpm_limit": 777})
    clients = [openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
               for tk in (plain, overridden)]
    tier = TierLimits.objects.get(tier="premium")
    before = tier.rpm_limit
    assert limit_header(clients[0], str(before)) == str(before)
    assert limit_header(clients[1], "777") == "777"
    try:
        admin_edit(admin_client, TierLimits, tier.pk, rpm_limit=before + 1)
        assert limit_header(clients[0], str(before + 1)) == str(before + 1)
        assert limit_header(clients[1], "777") == "777"
    finally:
        limits_set(target=TierLimits.objects.get(pk=tier.pk), rpm_limit=before)


def test_changing_a_tenants_tier_in_admin_moves_its_limits_and_billing_plan(gateway, make_tenant, admin_client):
    from billing.models import BillingAccount

    tk = make_tenant(tier="standard")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    assert limit_header(client, "600") == "600"
    admin_edit(admin_client, Tenant, tk.tenant.pk, tier="premium")
    premium = TierLimits.objects.get(tier="premium").rpm_limit
    assert limit_header(client, str(premium)) == str(premium)
    assert BillingAccount.objects.get(tenant=tk.tenant).plan.tier == "premium"

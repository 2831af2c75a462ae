import hashlib
import subprocess
import sys

import pytest
from django.core.management import call_command

from tenants.models import ApiKey, Membership, Tenant
from tenants.selectors import api_key_principal_get
from tenants.services import api_key_create, api_key_revoke, tenant_create
from tests.conftest import ROOT, process_env

pytestmark = pytest.mark.django_db


def test_key_has_prefix_256_bits_and_is_stored_only_as_hash():
    tenant = tenant_create(slug="acme", name="Acme")
    api_key, secret = api_key_create(tenant=tenant, name="ci")

    assert secret.startswith("sk-")
    # token_urlsafe(32): 43 url-safe characters carry the 256 random bits.
    assert len(secret) == 3 + 43
    assert api_key.prefix == secret[:12]
    assert api_key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert secret not in {getattr(stored, f.attname) for f in ApiKey._meta.concrete_fields if f.attname}


def test_two_keys_never_collide():
    tenant = tenant_create(slug="acme", name="Acme")
    secrets = {api_key_create(tenant=tenant, name=f"k{i}")[1] for i in range(50)}
    assert len(secrets) == 50


def test_principal_reports_revocation_expiry_and_suspension():
    from datetime import timedelta

    from django.utils import timezone

    tenant = tenant_create(slug="acme", name="Acme", tier=Tenant.Tier.PREMIUM)
    api_key, secret = api_key_create(tenant=tenant, name="a", expires_at=timezone.now() + timedelta(days=1))
    principal = api_key_principal_get(key_hash=api_key.key_hash)
    assert principal.tenant_tier == "premium" and principal.tenant_status == "active"
    assert principal.expires_at == pytest.approx(api_key.expires_at.timestamp())
    assert not principal.revoked

    api_key_revoke(api_key=api_key)
    assert api_key_principal_get(key_hash=api_key.key_hash).revoked
    assert api_key_principal_get(key_hash="0" * 64) is None


def test_revoked_key_name_can_be_reused():
    tenant = tenant_create(slug="acme", name="Acme")
    api_key, _ = api_key_create(tenant=tenant, name="prod")
    api_key_revoke(api_key=api_key)
    api_key_create(tenant=tenant, name="prod")
    assert ApiKey.objects.filter(tenant=tenant, name="prod").count() == 2


def test_management_commands_create_tenant_user_and_key(capsys):
    call_command("tenant_create", "globex", "--name", "Globex", "--tier", "standard")
    call_command("user_create", "hank", "--tenant", "globex", "--role", "owner", "--email", "h@globex.example")
    call_command("apikey_create", "globex", "--name", "ci", "--quiet")
    secret = capsys.readouterr().out.strip().splitlines()[-1]

    tenant = Tenant.objects.get(slug="globex")
    assert tenant.tier == "standard"
    assert Membership.objects.get(tenant=tenant).role == "owner"
    assert api_key_principal_get(key_hash=hashlib.sha256(secret.encode()).hexdigest()).tenant_slug == "globex"


def test_management_command_reports_unknown_tenant_without_traceback():
    from django.db import connection

    result = subprocess.run(
        [sys.executable, "manage.py", "apikey_create", "no-such-tenant"],
        cwd=ROOT, env=process_env(POSTGRES_DB=connection.settings_dict["NAME"]), capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "no tenant with slug 'no-such-tenant'" in result.stderr
    assert "Traceback" not in result.stderr

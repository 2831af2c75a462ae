from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from inference.services import backend_add, served_model_upsert
from tenants.models import Membership, Tenant
from tenants.selectors import tenant_get_by_slug
from tenants.services import api_key_create, membership_create, tenant_create, user_create


class Command(BaseCommand):
    help = "Create (or reuse) a demo tenant, its owner and a served model on the given backends; print a new key."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", default="demo")
        parser.add_argument("--model", default="demo-llm")
        parser.add_argument("--backend", action="append", default=[])
        parser.add_argument("--context-length", type=int, default=8192)

    @transaction.atomic
    def handle(self, *args, tenant, model, backend, context_length, **options):
        served = served_model_upsert(name=model, context_length=context_length)
        for url in backend:
            backend_add(model=served, url=url)
        tenant_row = tenant_get_by_slug(slug=tenant)
        if tenant_row is None:
            tenant_row = tenant_create(slug=tenant, name="Demo Organisation", tier=Tenant.Tier.STANDARD)
            owner = user_create(username=f"{tenant}-owner", email=f"owner@{tenant}.example")
            membership_create(tenant=tenant_row, user=owner, role=Membership.Role.OWNER)
        _, secret = api_key_create(tenant=tenant_row, name=f"demo {timezone.now():%Y-%m-%d %H:%M:%S.%f}")
        self.stdout.write(secret)

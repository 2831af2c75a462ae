from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from tenants.selectors import tenant_get_by_slug
from tenants.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant. The secret is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("--name", default="default")
        parser.add_argument("--expires-in-days", type=float, default=None)
        parser.add_argument("--quiet", action="store_true", help="print only the secret")

    def handle(self, *args, tenant, name, expires_in_days, quiet, **options):
        tenant_row = tenant_get_by_slug(slug=tenant)
        if tenant_row is None:
            raise CommandError(f"no tenant with slug {tenant!r}")
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        try:
            api_key, secret = api_key_create(tenant=tenant_row, name=name, expires_at=expires_at)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from error
        if quiet:
            self.stdout.write(secret)
        else:
            self.stdout.write(f"key {api_key.prefix}… name={api_key.name} tenant={tenant_row.slug}")
            self.stdout.write(f"secret (shown once): {secret}")

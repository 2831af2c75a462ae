from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.models import Tenant
from tenants.services import tenant_create


class Command(BaseCommand):
    help = "Create a tenant (customer organisation)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument("--tier", choices=Tenant.Tier.values, default=Tenant.Tier.FREE)

    def handle(self, *args, slug, name, tier, **options):
        try:
            tenant = tenant_create(slug=slug, name=name or slug, tier=tier)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from error
        self.stdout.write(f"tenant {tenant.slug} id={tenant.public_id} tier={tenant.tier}")

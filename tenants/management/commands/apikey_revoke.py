from django.core.management.base import BaseCommand, CommandError

from tenants.models import ApiKey
from tenants.services import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its visible prefix."

    def add_arguments(self, parser):
        parser.add_argument("prefix")

    def handle(self, *args, prefix, **options):
        matches = list(ApiKey.objects.filter(prefix=prefix, revoked_at__isnull=True))
        if len(matches) != 1:
            raise CommandError(f"{len(matches)} live keys have the prefix {prefix!r}; expected one")
        api_key_revoke(api_key=matches[0])
        self.stdout.write(f"revoked {prefix}…")

from django.core.management.base import BaseCommand, CommandError

from tenants.models import ApiKey, TierLimits
from tenants.selectors import tenant_get_by_slug
from tenants.services import limits_set

OPTIONS = {
    "rpm": "rpm_limit",
    "tpm": "tpm_limit",
    "concurrency": "concurrency_limit",
    "budget_minor": "monthly_budget_minor",
    "token_budget": "monthly_token_budget",
    "alert_percent": "budget_alert_percent",
}


class Command(BaseCommand):
    help = "Set rate limits and monthly budgets of a tier, a tenant or one of its keys ('none' clears a value)."

    def add_arguments(self, parser):
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--tier")
        target.add_argument("--tenant")
        parser.add_argument("--key", help="visible prefix of one of the tenant's keys")
        for option in OPTIONS:
            parser.add_argument(f"--{option.replace('_', '-')}")

    def handle(self, *args, tier, tenant, key, **options):
        values = {}
        for option, field in OPTIONS.items():
            raw = options.get(option)
            if raw is not None:
                values[field] = None if raw.lower() == "none" else int(raw)
        if not values:
            raise CommandError("name at least one limit to set")
        if tier:
            target = TierLimits.objects.filter(tier=tier).first()
        else:
            target = tenant_get_by_slug(slug=tenant)
            if target is not None and key:
                target = ApiKey.objects.filter(tenant=target, prefix=key, revoked_at__isnull=True).first()
        if target is None:
            raise CommandError("no such tier, tenant or key")
        limits_set(target=target, **values)
        self.stdout.write(f"{target}: " + ", ".join(f"{k}={v}" for k, v in values.items()))

from django.db import migrations

# Defaults per tier; operators change them in Django admin (Tier limits).
TIER_DEFAULTS = {
    "free": {"rpm_limit": 20, "tpm_limit": 40_000, "concurrency_limit": 4},
    "standard": {"rpm_limit": 600, "tpm_limit": 1_000_000, "concurrency_limit": 64},
    "premium": {"rpm_limit": 6_000, "tpm_limit": 10_000_000, "concurrency_limit": 512},
}


def tier_limits_create(apps, schema_editor):
    TierLimits = apps.get_model("tenants", "TierLimits")
    for tier, limits in TIER_DEFAULTS.items():
        TierLimits.objects.get_or_create(tier=tier, defaults={**limits, "budget_alert_percent": 80})


class Migration(migrations.Migration):
    dependencies = [("tenants", "0001_initial")]

    operations = [migrations.RunPython(tier_limits_create, migrations.RunPython.noop)]

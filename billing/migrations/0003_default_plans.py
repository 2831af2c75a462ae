from django.db import migrations

# (tier, code, name, included tokens per month); kept in step with billing.accounts.DEFAULT_PLANS.
PLANS = [
    ("free", "free", "Free", 1_000_000),
    ("standard", "payg", "Pay as you go", 0),
    ("premium", "premium", "Premium, pay as you go", 0),
]


def plans_seed(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    BillingAccount = apps.get_model("billing", "BillingAccount")
    Tenant = apps.get_model("tenants", "Tenant")
    for tier, code, name, included in PLANS:
        Plan.objects.get_or_create(tier=tier, defaults={"code": code, "name": name,
                                                        "included_tokens_per_month": included})
    for tenant in Tenant.objects.filter(billing_account__isnull=True):
        BillingAccount.objects.create(tenant=tenant, plan=Plan.objects.get(tier=tenant.tier))


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_price_book_rollups_stripe"), ("tenants", "0001_initial")]

    operations = [migrations.RunPython(plans_seed, migrations.RunPython.noop)]

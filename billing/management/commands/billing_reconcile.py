import re

from django.core.management.base import BaseCommand, CommandError

from billing.reconcile import reconcile_period


class Command(BaseCommand):
    help = ("Per tenant, for one calendar month (UTC): raw-event tokens, rollup tokens, billable tokens per "
            "price line, quantities sent to and accepted by Stripe, and cost. Exits 1 on any mismatch.")

    def add_arguments(self, parser):
        parser.add_argument("--period", required=True, help="YYYY-MM")
        parser.add_argument("--tenant", help="only this tenant (slug)")
        parser.add_argument("--no-stripe", action="store_true", help="skip the Stripe meter summaries")

    def handle(self, *args, period, no_stripe, tenant=None, **options):
        if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", period):
            raise CommandError("--period must be YYYY-MM")
        reports = reconcile_period(period=period, with_stripe=not no_stripe, tenant_slug=tenant)
        mismatches = 0
        for report in reports:
            raw, hourly, daily = report.raw, report.hourly, report.daily
            self.stdout.write(f"tenant {report.slug}")
            for label, sums in (("raw events", raw), ("hourly rollups", hourly), ("daily rollups", daily)):
                self.stdout.write(f"  {label:<15} requests={sums['requests']} prompt={sums['prompt']} "
                                  f"cached={sums['cached']} completion={sums['completion']}")
            for line in report.lines:
                stripe_text = "-" if line.stripe is None else format(line.stripe.normalize(), "f")
                self.stdout.write(f"  {line.event_name}: billable={line.billable} planned={line.planned} "
                                  f"sent={line.sent} stripe={stripe_text} cost={line.cost_minor}")
            for model, tokens in report.unpriced.items():
                self.stdout.write(f"  unpriced: {model} {tokens} tokens (no price version in force)")
            self.stdout.write(f"  cost {report.cost_minor} {report.currency or '-'} (minor units)")
            for problem in report.problems:
                self.stdout.write(self.style.ERROR(f"  MISMATCH {problem}"))
            mismatches += len(report.problems)
        self.stdout.write(f"{len(reports)} tenants, {mismatches} mismatches")
        if mismatches:
            raise SystemExit(1)

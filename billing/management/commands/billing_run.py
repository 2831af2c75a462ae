from django.core.management.base import BaseCommand

from billing.meter_push import meter_pushes_plan, meter_pushes_send
from billing.rollups import usage_rollup_catch_up


class Command(BaseCommand):
    help = "Run the periodic billing work once, now: rollups, push planning, meter event sending."

    def handle(self, *args, **options):
        results = usage_rollup_catch_up()
        planned = meter_pushes_plan()
        sent = meter_pushes_send()
        self.stdout.write(f"rollup passes={len(results)} dirty_hours={sum(r.dirty_hours for r in results)} "
                          f"pushes planned={planned} sent={sent}")

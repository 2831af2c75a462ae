import json

from django.core.management.base import BaseCommand, CommandError

from inference.models import ServedModel
from inference.pool_health import TTFT_BOUNDS_MS, WINDOW_SECONDS, pools_read

COLUMNS = ("model", "backend", "status", "health", "gateways", "in flight", "running", "queue", "KV use",
           "req/min", "errors", "failovers", "hit rate", "tok/s", "TTFT p50", "TTFT p99")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f">{TTFT_BOUNDS_MS[-1]:,} ms" if value == float("inf") else f"≤{value:,.0f} ms"


def _known(value: int) -> str:
    return "-" if value < 0 else str(value)


class Command(BaseCommand):
    help = ("The backend pools as the gateway processes see them now: health, circuit breakers, "
            f"load and KV use, and the last {WINDOW_SECONDS} s of traffic (requests, failures, "
            "prefix-cache hit rate, completion tokens/s, time to first token).")

    def add_arguments(self, parser):
        parser.add_argument("model", nargs="?", help="one model's pool (default: every model)")
        parser.add_argument("--json", action="store_true", help="one JSON object per backend, a list")

    def handle(self, *args, model=None, **options):
        if model is not None and not ServedModel.objects.filter(name=model).exists():
            raise CommandError(f"no model {model}")
        rows = pools_read(model)
        if options["json"]:
            self.stdout.write(_json_dumps([row.as_dict() for row in rows]))
            return
        if not rows:
            self.stdout.write("no backends")
            return
        table = [COLUMNS]
        for row in rows:
            gateways = f"{row.healthy_in}/{row.processes}" if row.processes else "-"
            table.append((
                row.model, row.url, row.status, row.health, gateways, str(row.in_flight),
                _known(row.running), _known(row.waiting),
                "-" if row.kv_usage < 0 else f"{row.kv_usage:.0%}" + (" +host" if row.host_tier else ""),
                str(row.requests), str(row.errors), str(row.failed_attempts),
                "-" if row.hit_rate is None else f"{row.hit_rate:.1%}",
                f"{row.completion_tokens_per_second:,.1f}", _ms(row.ttft_p50_ms), _ms(row.ttft_p99_ms),
            ))
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        for line in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        self.stdout.write(f"gateways: processes whose health checks pass / processes reporting; "
                          f"req/min … TTFT: the last {WINDOW_SECONDS} s, every gateway process together.")


def _json_dumps(value) -> str:
    return json.dumps(value, indent=2, allow_nan=False)

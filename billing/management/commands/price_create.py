from datetime import datetime
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from billing.price_book import price_create


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise CommandError(f"not a decimal: {text}") from None


class Command(BaseCommand):
    help = "Add a price version of a model (per 1M tokens, in BILLING_CURRENCY), in force from a whole UTC hour."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("--version", required=True)
        parser.add_argument("--input", required=True, type=_decimal, help="per 1M uncached input tokens")
        parser.add_argument("--cached-input", required=True, type=_decimal, help="per 1M cached input tokens")
        parser.add_argument("--output", required=True, type=_decimal, help="per 1M output tokens")
        parser.add_argument("--effective-from", required=True, help="ISO 8601 with offset, e.g. 2026-01-01T00:00Z")

    def handle(self, *args, model, version, input, cached_input, output, effective_from, **options):
        try:
            moment = datetime.fromisoformat(effective_from.replace("Z", "+00:00"))
            price = price_create(model=model, version=version, input_per_million=input,
                                 cached_input_per_million=cached_input, output_per_million=output,
                                 effective_from=moment)
        except (ValueError, ValidationError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"price {price} from {price.effective_from.isoformat()} "
                          f"({', '.join(line.event_name for line in price.lines.all())})")

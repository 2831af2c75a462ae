from django.core.management.base import BaseCommand, CommandError

from inference.models import Backend
from inference.services import backend_remove, backend_set_status


class Command(BaseCommand):
    help = "Set a backend active, draining or disabled, or remove it."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("url")
        parser.add_argument("status", choices=[*Backend.Status.values, "remove"])

    def handle(self, *args, model, url, status, **options):
        backend = Backend.objects.filter(model__name=model, url=url.rstrip("/")).first()
        if backend is None:
            raise CommandError(f"no backend {url} for model {model}")
        if status == "remove":
            backend_remove(backend=backend)
        else:
            backend_set_status(backend=backend, status=status)
        self.stdout.write(f"{model} @ {url}: {status}")
